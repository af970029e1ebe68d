// Python binding of the CUDA ProGrad-SGD step (kernels and host code: prograd_cuda.cu).

#include <torch/extension.h>
#include <pybind11/stl.h>

#include <optional>
#include <tuple>
#include <vector>

std::tuple<std::vector<std::optional<at::Tensor>>, at::Tensor, int64_t>
prograd_sgd_cuda(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                 const std::vector<std::optional<at::Tensor>>& generals,
                 std::vector<std::optional<at::Tensor>> bufs, double lr,
                 const std::optional<at::Tensor>& lr_tensor, double momentum, double dampening,
                 double weight_decay, bool nesterov, bool maximize, double lam, bool global,
                 const std::optional<at::Tensor>& grad_scale,
                 const std::optional<at::Tensor>& found_inf,
                 const std::optional<at::Tensor>& workspace, const at::Tensor& slot_starts,
                 const at::Tensor& stats_f, const at::Tensor& stats_b, int64_t plan);
void set_poison_new_buffers_cuda(bool on);
void set_coop_capacity_override_cuda(int64_t blocks);
int64_t chunk_elements_cuda();

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ProGrad-SGD fused CUDA kernels (prograd_fast)";
  m.def("prograd_sgd", &prograd_sgd_cuda,
        "One ProGrad-SGD step on one CUDA parameter group. plan: 0 auto, 1 single block, "
        "2 cooperative single pass, 3 two-pass. Statistics go into stats_f/stats_b. "
        "Returns (buffers, workspace, plan used).",
        py::arg("params"), py::arg("grads"), py::arg("general_grads"),
        py::arg("momentum_buffers"), py::arg("lr"), py::arg("lr_tensor"), py::arg("momentum"),
        py::arg("dampening"), py::arg("weight_decay"), py::arg("nesterov"), py::arg("maximize"),
        py::arg("lam"), py::arg("global_"), py::arg("grad_scale"), py::arg("found_inf"),
        py::arg("workspace"), py::arg("slot_starts"), py::arg("stats_f"), py::arg("stats_b"),
        py::arg("plan"));
  m.def("set_poison_new_buffers", &set_poison_new_buffers_cuda,
        "Tests only: fill momentum buffers created by the kernel with NaN before writing them");
  m.def("set_coop_capacity_override", &set_coop_capacity_override_cuda,
        "Tests only: pretend the device holds this many co-resident cooperative blocks "
        "(-1: measure). Larger than the truth exercises the too-large fallback.");
  m.attr("CHUNK") = chunk_elements_cuda();  // elements per partial slot (slot_starts)
  m.attr("PLANS") = py::dict(py::arg("auto") = 0, py::arg("small") = 1, py::arg("coop") = 2,
                             py::arg("two_pass") = 3);
}
