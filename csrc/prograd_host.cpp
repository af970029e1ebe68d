// The per-tensor reads of ProGradSGD's host path, in C (issue 10, item 7).
//
// Every step the optimizer reads, for each parameter, its .grad, its pending general
// gradient (kept by the optimizer, aligned with the group's parameters), its state dict's
// momentum buffer, and the address, size, dtype, device and layout of
// all four tensors: in Python that is ~25 passes over the tensor lists (~2 us each for 27
// tensors on a slow core).  These functions do the same reads in one pass each and return
// "not here" (NotImplemented / None / False) for anything unusual -- a tensor subclass, a
// sparse or nested tensor, a missing state entry -- so the Python path, which raises the clear
// errors, stays the reference.  They never decide whether a step is valid: they only answer
// "same as last time?" questions and move references between lists.
//
// Raw METH_FASTCALL functions (a pybind11 call costs more than the work for CoOp's one
// tensor); only torch.Tensor and torch.nn.Parameter objects are read (THPVariable_CheckExact).

#include <Python.h>

#include <ATen/core/Tensor.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <vector>

namespace {

// Words per tensor in a fingerprint (see fingerprint()).
constexpr Py_ssize_t kWords = 6;

// The tensor behind ``obj`` when it is a plain dense one whose metadata can be read here:
// exactly torch.Tensor or Parameter (a subclass may redefine everything), strided, not
// nested, with storage and concrete sizes, no Python dispatch.  nullptr otherwise.
const at::Tensor* plain(PyObject* obj) {
  if (!THPVariable_CheckExact(obj)) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (!t.defined()) return nullptr;
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  if (impl->layout() != c10::kStrided || impl->is_nested() || !impl->has_storage() ||
      impl->has_symbolic_sizes_strides() || impl->is_python_dispatch()) {
    return nullptr;
  }
  return &t;
}

bool same_meta(const at::Tensor& a, const at::Tensor& b) {
  return a.sizes().equals(b.sizes()) && a.scalar_type() == b.scalar_type() &&
         a.device() == b.device();
}

bool is_list(PyObject* obj, Py_ssize_t n) {
  return PyList_CheckExact(obj) && PyList_GET_SIZE(obj) == n;
}

PyObject* not_here() { Py_RETURN_NOTIMPLEMENTED; }

// same_items(d: dict, keys: tuple, values: tuple) -> bool
// True when ``d`` holds exactly these entries, in this order, as the very same objects
// (identity, no hashing: Tensor.__hash__ is a Python function).  The optimizer's state
// dicts are looked up once and reused while this holds.
PyObject* same_items(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 3 || !PyDict_Check(args[0]) || !PyTuple_CheckExact(args[1]) ||
      !PyTuple_CheckExact(args[2])) {
    PyErr_SetString(PyExc_TypeError, "same_items(dict, tuple, tuple)");
    return nullptr;
  }
  PyObject* d = args[0];
  PyObject* keys = args[1];
  PyObject* values = args[2];
  const Py_ssize_t n = PyTuple_GET_SIZE(keys);
  if (PyDict_GET_SIZE(d) != n || PyTuple_GET_SIZE(values) != n) Py_RETURN_FALSE;
  Py_ssize_t pos = 0, i = 0;
  PyObject* k;
  PyObject* v;
  while (PyDict_Next(d, &pos, &k, &v)) {
    if (i >= n || k != PyTuple_GET_ITEM(keys, i) || v != PyTuple_GET_ITEM(values, i)) {
      Py_RETURN_FALSE;
    }
    ++i;
  }
  if (i != n) Py_RETURN_FALSE;
  Py_RETURN_TRUE;
}

// same_objects(seq: list | tuple, ref: tuple) -> bool: the same objects, in order.
PyObject* same_objects(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2 || !PyTuple_CheckExact(args[1])) {
    PyErr_SetString(PyExc_TypeError, "same_objects(list, tuple)");
    return nullptr;
  }
  PyObject* seq = args[0];
  PyObject* ref = args[1];
  if (!PyList_CheckExact(seq) && !PyTuple_CheckExact(seq)) Py_RETURN_FALSE;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  if (n != PyTuple_GET_SIZE(ref)) Py_RETURN_FALSE;
  PyObject** items = PySequence_Fast_ITEMS(seq);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (items[i] != PyTuple_GET_ITEM(ref, i)) Py_RETURN_FALSE;
  }
  Py_RETURN_TRUE;
}

// matching(params: list, grads: list) -> bool
// True when every gradient (None entries skipped) is a plain tensor matching its
// parameter's sizes, dtype and device, real and not requiring grad: the optimizer then
// keeps the list as it is.  False otherwise: the Python path then checks, names the
// problem and detaches.
PyObject* matching(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2) {
    PyErr_SetString(PyExc_TypeError, "matching(list, list)");
    return nullptr;
  }
  PyObject* params = args[0];
  PyObject* grads = args[1];
  if (!PyList_CheckExact(params)) Py_RETURN_FALSE;
  const Py_ssize_t n = PyList_GET_SIZE(params);
  if (!is_list(grads, n)) Py_RETURN_FALSE;
  try {
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* g = PyList_GET_ITEM(grads, i);
      if (g == Py_None) continue;
      const at::Tensor* gt = plain(g);
      const at::Tensor* pt = plain(PyList_GET_ITEM(params, i));
      if (!gt || !pt || gt->requires_grad() || c10::isComplexType(pt->scalar_type()) ||
          !same_meta(*gt, *pt)) {
        Py_RETURN_FALSE;
      }
    }
  } catch (const std::exception&) {
    Py_RETURN_FALSE;
  }
  Py_RETURN_TRUE;
}

// gather(params: list, sds: list | None, generals: list | None, momentum: bool,
//        buffer_key: str) -> (params, grads, generals, buffers, any_general) | () | NotImplemented
// One group's tensors, as _step.gather in Python: the parameters with a .grad and, aligned,
// their gradients, general gradients (``generals``: the group's pending ones, aligned with
// ``params``, or None for none) and momentum buffers (read from the state dicts ``sds``;
// None without momentum, when ``sds`` may be None).  () when no parameter has a gradient.
// NotImplemented for anything the Python path must look at: a tensor subclass (DTensor),
// a sparse or complex gradient, a state entry that is not a dict, lists that do not align.
// ``params`` itself is returned when every parameter has a gradient.
PyObject* gather(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 5 || !PyUnicode_Check(args[4])) {
    PyErr_SetString(PyExc_TypeError, "gather(list, list | None, list | None, bool, str)");
    return nullptr;
  }
  PyObject* params = args[0];
  PyObject* sds = args[1];
  PyObject* generals = args[2];
  const int momentum = PyObject_IsTrue(args[3]);
  if (momentum < 0) return nullptr;
  PyObject* bkey = args[4];
  if (!PyList_CheckExact(params)) return not_here();  // e.g. a tuple set by hand
  const Py_ssize_t n = PyList_GET_SIZE(params);
  if (momentum && !is_list(sds, n)) return not_here();
  if (generals != Py_None && !is_list(generals, n)) return not_here();

  std::vector<PyObject*> grads(n, nullptr);  // new references
  std::vector<PyObject*> bufs(n, Py_None);   // borrowed
  auto drop = [&grads]() {
    for (PyObject* g : grads) Py_XDECREF(g);
  };
  Py_ssize_t kept = 0;
  try {
    for (Py_ssize_t i = 0; i < n; ++i) {  // read and check, change nothing
      const at::Tensor* pt = plain(PyList_GET_ITEM(params, i));
      if (!pt) {
        drop();
        return not_here();
      }
      // What Tensor.grad's getter does for exact Tensor/Parameter objects, minus the
      // generic attribute look-up.
      PyObject* g = THPVariable_Wrap(pt->grad());
      if (g == nullptr) {
        drop();
        return nullptr;
      }
      grads[i] = g;
      if (g != Py_None) {
        const at::Tensor* gt = plain(g);
        if (!gt || c10::isComplexType(gt->scalar_type())) {
          drop();
          return not_here();
        }
        ++kept;
      }
      PyObject* general = generals == Py_None ? Py_None : PyList_GET_ITEM(generals, i);
      if (general != Py_None && !plain(general)) {
        drop();
        return not_here();
      }
      if (!momentum) continue;
      PyObject* sd = PyList_GET_ITEM(sds, i);
      if (sd == Py_None) continue;
      if (!PyDict_CheckExact(sd)) {
        drop();
        return not_here();
      }
      PyObject* buf = PyDict_GetItemWithError(sd, bkey);
      if (buf == nullptr && PyErr_Occurred()) {
        drop();
        return nullptr;
      }
      if (buf != nullptr && buf != Py_None) {
        if (!plain(buf)) {
          drop();
          return not_here();
        }
        bufs[i] = buf;
      }
    }
  } catch (const std::exception&) {
    drop();
    return not_here();
  }
  if (kept == 0) {
    drop();
    return PyTuple_New(0);
  }

  PyObject* out_p = kept == n ? (Py_INCREF(params), params) : PyList_New(kept);
  PyObject* out_d = PyList_New(kept);
  PyObject* out_g = PyList_New(kept);
  PyObject* out_b = PyList_New(kept);
  if (!out_p || !out_d || !out_g || !out_b) {
    Py_XDECREF(out_p), Py_XDECREF(out_d), Py_XDECREF(out_g), Py_XDECREF(out_b);
    drop();
    return nullptr;
  }
  bool any_general = false;
  Py_ssize_t j = 0;
  for (Py_ssize_t i = 0; i < n; ++i) {  // fill the lists
    PyObject* g = grads[i];
    if (g == Py_None) {
      Py_DECREF(g);
      continue;
    }
    PyObject* general = generals == Py_None ? Py_None : PyList_GET_ITEM(generals, i);
    if (general != Py_None) any_general = true;
    Py_INCREF(general);
    Py_INCREF(bufs[i]);
    if (kept != n) {
      PyObject* p = PyList_GET_ITEM(params, i);
      Py_INCREF(p);
      PyList_SET_ITEM(out_p, j, p);
    }
    PyList_SET_ITEM(out_d, j, g);  // steals the reference
    PyList_SET_ITEM(out_g, j, general);
    PyList_SET_ITEM(out_b, j, bufs[i]);
    ++j;
  }
  PyObject* out = PyTuple_New(5);
  if (out == nullptr) {
    Py_DECREF(out_p), Py_DECREF(out_d), Py_DECREF(out_g), Py_DECREF(out_b);
    return nullptr;
  }
  PyObject* flag = any_general ? Py_True : Py_False;
  Py_INCREF(flag);
  PyTuple_SET_ITEM(out, 0, out_p);  // steal
  PyTuple_SET_ITEM(out, 1, out_d);
  PyTuple_SET_ITEM(out, 2, out_g);
  PyTuple_SET_ITEM(out, 3, out_b);
  PyTuple_SET_ITEM(out, 4, flag);
  return out;
}

// fingerprint(params: list, grads: list, generals: list, buffers: list | ()) -> bytes | None
// Six int64 words per parameter describing everything a launch cache depends on: the
// addresses of the parameter, its gradient, general gradient and momentum buffer (0 when
// None), the parameter's element count, and one word packing its dtype and device with the
// flags "general present", "buffer present", "all four contiguous", "all match the
// parameter's sizes / dtype / device", "a lazy negation or conjugation bit".  Equal
// fingerprints: the very same memory seen the very same way.  None when a tensor is not a
// plain dense one (the caller's Python path then decides) or the lists do not align.
PyObject* fingerprint(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 4) {
    PyErr_SetString(PyExc_TypeError, "fingerprint(list, list, list, list)");
    return nullptr;
  }
  PyObject* lists[4];
  for (int k = 0; k < 4; ++k) {
    lists[k] = args[k];
    if (!PyList_CheckExact(lists[k]) && !PyTuple_CheckExact(lists[k])) Py_RETURN_NONE;
  }
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(lists[0]);
  const Py_ssize_t nb = PySequence_Fast_GET_SIZE(lists[3]);
  if (n == 0 || PySequence_Fast_GET_SIZE(lists[1]) != n ||
      PySequence_Fast_GET_SIZE(lists[2]) != n || (nb != n && nb != 0)) {
    Py_RETURN_NONE;
  }
  PyObject** ps = PySequence_Fast_ITEMS(lists[0]);
  PyObject** ds = PySequence_Fast_ITEMS(lists[1]);
  PyObject** gs = PySequence_Fast_ITEMS(lists[2]);
  PyObject** bs = nb ? PySequence_Fast_ITEMS(lists[3]) : nullptr;
  PyObject* out = PyBytes_FromStringAndSize(nullptr, n * kWords * sizeof(int64_t));
  if (out == nullptr) return nullptr;
  auto* w = reinterpret_cast<int64_t*>(PyBytes_AS_STRING(out));
  try {
    for (Py_ssize_t i = 0; i < n; ++i, w += kWords) {
      const at::Tensor* p = plain(ps[i]);
      const at::Tensor* d = plain(ds[i]);
      const at::Tensor* g = gs[i] == Py_None ? nullptr : plain(gs[i]);
      const at::Tensor* b = (bs == nullptr || bs[i] == Py_None) ? nullptr : plain(bs[i]);
      if (!p || !d || (gs[i] != Py_None && !g) || (bs && bs[i] != Py_None && !b)) {
        Py_DECREF(out);
        Py_RETURN_NONE;
      }
      bool contiguous = true, matches = true, lazy = false;
      for (const at::Tensor* t : {p, d, g, b}) {
        if (t == nullptr) continue;
        contiguous = contiguous && t->is_contiguous();
        matches = matches && (t == p || same_meta(*t, *p));
        lazy = lazy || t->is_neg() || t->is_conj();
      }
      const c10::Device dev = p->device();
      const uint64_t meta =
          static_cast<uint64_t>(static_cast<uint8_t>(p->scalar_type())) |
          static_cast<uint64_t>(static_cast<uint8_t>(dev.type())) << 8 |
          static_cast<uint64_t>(static_cast<uint16_t>(dev.index() + 1)) << 16 |
          static_cast<uint64_t>(g != nullptr) << 32 | static_cast<uint64_t>(b != nullptr) << 33 |
          static_cast<uint64_t>(contiguous) << 34 | static_cast<uint64_t>(matches) << 35 |
          static_cast<uint64_t>(lazy) << 36;
      w[0] = reinterpret_cast<intptr_t>(p->data_ptr());
      w[1] = reinterpret_cast<intptr_t>(d->data_ptr());
      w[2] = g ? reinterpret_cast<intptr_t>(g->data_ptr()) : 0;
      w[3] = b ? reinterpret_cast<intptr_t>(b->data_ptr()) : 0;
      w[4] = p->numel();
      w[5] = static_cast<int64_t>(meta);
    }
  } catch (const std::exception&) {
    Py_DECREF(out);
    Py_RETURN_NONE;
  }
  return out;
}

// address_rows(fp: bytes, old: bytes, element_size: int, rows: int, row: int,
//              general_bit: int, aligned_bit: int) -> bool
// The address part of the Triton backend's offset table, rewritten from a fingerprint
// ``fp`` whose structure (every tensor's element count and the word of dtype, device and
// flags) equals that of ``old``, the fingerprint the table was checked for: per tensor i, ``rows[i*row + k]`` (k < 4) = element offset of p, d, g, buf from the
// first parameter (a missing one: 0), and ``rows[i*row + 7]`` = general_bit when a general
// gradient is present | aligned_bit when all four addresses are 16-byte aligned (the
// first-step bit cleared).  ``rows`` is the address of a CPU int64 buffer of at least
// n * row entries, owned by the caller.  False, nothing written, when the structures
// differ, or an address is not a whole number of elements away from the first parameter's
// or not a multiple of the element size (the caller then runs its full check).
PyObject* address_rows(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 7 || !PyBytes_CheckExact(args[0]) || !PyBytes_CheckExact(args[1])) {
    PyErr_SetString(PyExc_TypeError, "address_rows(bytes, bytes, int, int, int, int, int)");
    return nullptr;
  }
  const long long size = PyLong_AsLongLong(args[2]);
  void* rows_ptr = PyLong_AsVoidPtr(args[3]);
  const long long row = PyLong_AsLongLong(args[4]);
  const long long general_bit = PyLong_AsLongLong(args[5]);
  const long long aligned_bit = PyLong_AsLongLong(args[6]);
  if (PyErr_Occurred()) return nullptr;
  const Py_ssize_t bytes = PyBytes_GET_SIZE(args[0]);
  if (size <= 0 || row < 8 || rows_ptr == nullptr || PyBytes_GET_SIZE(args[1]) != bytes ||
      bytes % static_cast<Py_ssize_t>(kWords * sizeof(int64_t)) != 0 || bytes == 0) {
    Py_RETURN_FALSE;
  }
  const auto* w = reinterpret_cast<const int64_t*>(PyBytes_AS_STRING(args[0]));
  const auto* o = reinterpret_cast<const int64_t*>(PyBytes_AS_STRING(args[1]));
  const Py_ssize_t n = bytes / static_cast<Py_ssize_t>(kWords * sizeof(int64_t));
  const int64_t base = w[0];
  for (Py_ssize_t i = 0; i < n; ++i) {  // check everything before writing anything
    if (w[i * kWords + 4] != o[i * kWords + 4] || w[i * kWords + 5] != o[i * kWords + 5]) {
      Py_RETURN_FALSE;
    }
    for (int k = 0; k < 4; ++k) {
      const int64_t a = w[i * kWords + k] == 0 ? base : w[i * kWords + k];
      if (a % size != 0 || (a - base) % size != 0) Py_RETURN_FALSE;
    }
  }
  auto* rows = static_cast<int64_t*>(rows_ptr);
  for (Py_ssize_t i = 0; i < n; ++i) {
    const int64_t* t = w + i * kWords;
    int64_t* r = rows + i * row;
    bool aligned = true;
    for (int k = 0; k < 4; ++k) {
      const int64_t a = t[k] == 0 ? base : t[k];
      r[k] = (a - base) / size;
      aligned = aligned && (a % 16 == 0);
    }
    const bool general = (static_cast<uint64_t>(t[5]) >> 32) & 1;
    r[7] = (general ? general_bit : 0) | (aligned ? aligned_bit : 0);
  }
  Py_RETURN_TRUE;
}

PyMethodDef kMethods[] = {
    {"same_items", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(same_items)),
     METH_FASTCALL, "same_items(dict, keys, values) -> bool"},
    {"same_objects", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(same_objects)),
     METH_FASTCALL, "same_objects(seq, ref) -> bool"},
    {"matching", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(matching)),
     METH_FASTCALL, "matching(params, grads) -> bool"},
    {"gather", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(gather)),
     METH_FASTCALL, "gather(params, state_dicts, generals, momentum, buffer_key)"},
    {"fingerprint", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fingerprint)),
     METH_FASTCALL, "fingerprint(params, grads, generals, buffers) -> bytes | None"},
    {"address_rows", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(address_rows)),
     METH_FASTCALL,
     "address_rows(fp, old_fp, element_size, rows_ptr, row, general_bit, aligned_bit)"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ProGradSGD's host path: per-tensor reads in C (prograd_fast._host)";
  if (PyModule_AddFunctions(m.ptr(), kMethods) < 0) throw pybind11::error_already_set();
  m.attr("WORDS") = kWords;
}
