// Python binding of the CUDA ProGrad-SGD step (kernels and host code: prograd_cuda.cu).

#include <torch/extension.h>
#include <pybind11/stl.h>

#include <optional>
#include <tuple>
#include <vector>

std::tuple<std::vector<at::Tensor>, std::vector<std::optional<at::Tensor>>, at::Tensor, at::Tensor,
           int64_t>
prograd_sgd_cuda(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                 const std::vector<std::optional<at::Tensor>>& generals,
                 std::vector<std::optional<at::Tensor>> bufs, double lr,
                 const std::optional<at::Tensor>& lr_tensor, double momentum, double dampening,
                 double weight_decay, bool nesterov, bool maximize, double lam, bool global,
                 const std::optional<at::Tensor>& grad_scale,
                 const std::optional<at::Tensor>& found_inf,
                 const std::optional<at::Tensor>& workspace,
                 const std::optional<at::Tensor>& slot_cache, int64_t plan);
void set_poison_new_buffers_cuda(bool on);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ProGrad-SGD fused CUDA kernels (prograd_fast)";
  m.def("prograd_sgd", &prograd_sgd_cuda,
        "One ProGrad-SGD step on one CUDA parameter group. plan: 0 auto, 1 single block, "
        "2 cooperative single pass, 3 two-pass. Returns (stats, buffers, workspace, slots, plan).",
        py::arg("params"), py::arg("grads"), py::arg("general_grads"),
        py::arg("momentum_buffers"), py::arg("lr"), py::arg("lr_tensor"), py::arg("momentum"),
        py::arg("dampening"), py::arg("weight_decay"), py::arg("nesterov"), py::arg("maximize"),
        py::arg("lam"), py::arg("global_"), py::arg("grad_scale"), py::arg("found_inf"),
        py::arg("workspace"), py::arg("slot_cache"), py::arg("plan"));
  m.def("set_poison_new_buffers", &set_poison_new_buffers_cuda,
        "Tests only: fill momentum buffers created by the kernel with NaN before writing them");
  m.attr("PLANS") = py::dict(py::arg("auto") = 0, py::arg("small") = 1, py::arg("coop") = 2,
                             py::arg("two_pass") = 3);
}
