// pyinf._C: a thin pybind11 layer over the C API. Tensors arrive as plain Python objects;
// pointers, shapes, strides, dtype and device are read through their Python attributes
// (data_ptr(), shape, stride(), dtype, device), so this module never includes or links
// against torch's C++ API and is immune to its ABI. Every check happens before the C
// call; failures become Python exceptions (ValueError / TypeError / RuntimeError).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "pyinf/pyinf.h"

namespace py = pybind11;

namespace {

struct Arg {
  pyinf_tensor t{};
  std::string device_type;
  int64_t device_index = -1;
  std::string dtype_name;
  bool present = false;
};

std::string where(const char* op, const char* name) { return std::string("pyinf._C.") + op + ": '" + name + "'"; }

std::vector<int64_t> int_tuple(py::handle seq) {
  std::vector<int64_t> out;
  for (py::handle v : seq) out.push_back(v.cast<int64_t>());
  return out;
}

Arg read(py::handle obj, const char* op, const char* name, int ndim, bool mask = false, bool optional = false) {
  Arg a;
  if (obj.is_none()) {
    if (optional) return a;
    throw py::type_error(where(op, name) + " must be a tensor, got None");
  }
  for (const char* attr : {"data_ptr", "shape", "stride", "dtype", "device"}) {
    if (!py::hasattr(obj, attr))
      throw py::type_error(where(op, name) + " must be a torch.Tensor-like object (missing '" + attr + "'), got " +
                           std::string(py::str(py::type::of(obj))));
  }
  a.present = true;
  a.dtype_name = py::str(obj.attr("dtype"));
  if (mask) {
    if (a.dtype_name != "torch.bool") throw py::type_error(where(op, name) + " must be torch.bool, got " + a.dtype_name);
    a.t.dtype = PYINF_BOOL;
  } else if (a.dtype_name == "torch.float32") {
    a.t.dtype = PYINF_FLOAT32;
  } else if (a.dtype_name == "torch.bfloat16") {
    a.t.dtype = PYINF_BFLOAT16;
  } else if (a.dtype_name == "torch.float16") {
    a.t.dtype = PYINF_FLOAT16;
  } else {
    throw py::type_error(where(op, name) + " must be float32, bfloat16 or float16 for the native backend, got " +
                         a.dtype_name);
  }
  const auto shape = int_tuple(obj.attr("shape"));
  const auto stride = int_tuple(obj.attr("stride")());
  if (static_cast<int>(shape.size()) != ndim)
    throw py::value_error(where(op, name) + " must have " + std::to_string(ndim) + " dimensions, got " +
                          std::to_string(shape.size()));
  a.t.ndim = ndim;
  for (int i = 0; i < ndim; ++i) {
    a.t.shape[i] = shape[i];
    a.t.strides[i] = stride[i];
    if (stride[i] < 0) throw py::value_error(where(op, name) + " has a negative stride");
  }
  a.t.data = reinterpret_cast<const void*>(static_cast<uintptr_t>(obj.attr("data_ptr")().cast<uint64_t>()));
  py::object dev = obj.attr("device");
  a.device_type = py::str(dev.attr("type"));
  py::object idx = dev.attr("index");
  a.device_index = idx.is_none() ? -1 : idx.cast<int64_t>();
  if (a.device_type != "cpu" && a.device_type != "cuda")
    throw py::value_error(where(op, name) + " is on device '" + a.device_type +
                          "'; the native backend runs on cpu and cuda tensors only");
  return a;
}

// The output: float32, C-contiguous, exactly `shape`, on the inputs' device.
float* read_out(py::handle obj, const char* op, const std::vector<int64_t>& shape, const Arg& like,
               const char* name = "out") {
  Arg o = read(obj, op, name, static_cast<int>(shape.size()));
  if (o.t.dtype != PYINF_FLOAT32) throw py::type_error(where(op, name) + " must be float32, got " + o.dtype_name);
  bool empty = false;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (o.t.shape[i] != shape[i])
      throw py::value_error(where(op, name) + " has the wrong shape (dimension " + std::to_string(i) + " is " +
                            std::to_string(o.t.shape[i]) + ", expected " + std::to_string(shape[i]) + ")");
    empty = empty || shape[i] == 0;
  }
  // Dense row-major: each dimension of size > 1 strides over the ones after it. An empty
  // output is never written, so its strides do not matter (torch gives it any: [2, 0, 3]
  // has strides (3, 3, 1), while the running product past a 0 would expect 0).
  int64_t expect = 1;
  for (int i = static_cast<int>(shape.size()) - 1; i >= 0 && !empty; --i) {
    if (shape[i] > 1 && o.t.strides[i] != expect) throw py::value_error(where(op, name) + " must be contiguous");
    expect *= shape[i];
  }
  if (o.device_type != like.device_type || o.device_index != like.device_index)
    throw py::value_error(where(op, name) + " must be on the inputs' device");
  return const_cast<float*>(static_cast<const float*>(o.t.data));
}

void same_device(const char* op, const std::vector<std::pair<const char*, const Arg*>>& args) {
  const Arg* first = nullptr;
  for (auto& kv : args) {
    if (!kv.second->present) continue;
    if (first == nullptr) {
      first = kv.second;
      continue;
    }
    if (kv.second->device_type != first->device_type || kv.second->device_index != first->device_index)
      throw py::value_error(std::string("pyinf._C.") + op + ": all tensors must be on one device; '" + kv.first +
                            "' is on " + kv.second->device_type + ":" + std::to_string(kv.second->device_index) +
                            ", '" + args[0].first + "' on " + first->device_type + ":" +
                            std::to_string(first->device_index));
  }
}

void raise_status(pyinf_status s) {
  if (s == PYINF_SUCCESS) return;
  std::string msg = pyinf_last_error();
  msg += " [";
  msg += pyinf_status_string(s);
  msg += "]";
  if (s == PYINF_ERROR_INVALID_VALUE || s == PYINF_ERROR_WORKSPACE) throw py::value_error(msg);
  if (s == PYINF_ERROR_UNSUPPORTED_DTYPE) throw py::type_error(msg);
  throw std::runtime_error(msg);
}

bool is_cuda(const Arg& a) { return a.device_type == "cuda"; }

void require_cuda_build(const char* op) {
  if (!pyinf_cuda_compiled())
    throw std::runtime_error(std::string("pyinf._C.") + op +
                             ": CUDA tensors given, but this pyinf._C was built without CUDA (rebuild with nvcc on "
                             "PATH and PYINF_CUDA=1)");
}

void* stream_ptr(py::handle stream) {
  return stream.is_none() ? nullptr : reinterpret_cast<void*>(static_cast<uintptr_t>(stream.cast<uint64_t>()));
}

// Workspace: a 1-D tensor on the device (any dtype); returns pointer and size in bytes.
std::pair<void*, size_t> read_workspace(py::handle ws, const char* op, const Arg& like,
                                        const char* name = "workspace") {
  if (ws.is_none()) return {nullptr, 0};
  py::object dev = ws.attr("device");
  const std::string type = py::str(dev.attr("type"));
  py::object idx = dev.attr("index");
  const int64_t index = idx.is_none() ? -1 : idx.cast<int64_t>();
  if (type != like.device_type || index != like.device_index)
    throw py::value_error(where(op, name) + " must be on the inputs' device");
  if (!ws.attr("is_contiguous")().cast<bool>()) throw py::value_error(where(op, name) + " must be contiguous");
  const size_t bytes = ws.attr("numel")().cast<size_t>() * ws.attr("element_size")().cast<size_t>();
  return {reinterpret_cast<void*>(static_cast<uintptr_t>(ws.attr("data_ptr")().cast<uint64_t>())), bytes};
}

const pyinf_tensor* opt(const Arg& a) { return a.present ? &a.t : nullptr; }

void covariance(py::handle x_, py::handle mask_, py::handle out_, py::handle stream) {
  const char* op = "covariance";
  Arg x = read(x_, op, "x", 3), mask = read(mask_, op, "mask", 2, true, true);
  same_device(op, {{"x", &x}, {"mask", &mask}});
  float* out = read_out(out_, op, {x.t.shape[2], x.t.shape[2]}, x);
  pyinf_status s;
  if (is_cuda(x)) {
    require_cuda_build(op);
    s = pyinf_cuda_covariance(&x.t, opt(mask), out, stream_ptr(stream));
  } else {
    py::gil_scoped_release nogil;
    s = pyinf_cpu_covariance(&x.t, opt(mask), out);
  }
  raise_status(s);
}

size_t rotated_workspace_size(py::handle acts_, py::handle grads_, bool self) {
  const char* op = self ? "self_influence_workspace_size" : "eigen_correction_workspace_size";
  Arg acts = read(acts_, op, "acts", 3), grads = read(grads_, op, "grads", 3);
  if (!is_cuda(acts)) return 0;  // the CPU path allocates for itself
  require_cuda_build(op);
  size_t bytes = 0;
  raise_status(self ? pyinf_cuda_self_influence_workspace_size(&acts.t, &grads.t, &bytes)
                    : pyinf_cuda_eigen_correction_workspace_size(&acts.t, &grads.t, &bytes));
  return bytes;
}

void eigen_correction(py::handle acts_, py::handle grads_, py::handle qa_, py::handle qs_, py::handle mask_,
                      py::handle out_, py::handle ws_, py::handle stream) {
  const char* op = "eigen_correction";
  Arg acts = read(acts_, op, "acts", 3), grads = read(grads_, op, "grads", 3);
  Arg qa = read(qa_, op, "q_a", 2), qs = read(qs_, op, "q_s", 2), mask = read(mask_, op, "mask", 2, true, true);
  same_device(op, {{"acts", &acts}, {"grads", &grads}, {"q_a", &qa}, {"q_s", &qs}, {"mask", &mask}});
  float* out = read_out(out_, op, {grads.t.shape[2], acts.t.shape[2]}, acts);
  pyinf_status s;
  if (is_cuda(acts)) {
    require_cuda_build(op);
    auto ws = read_workspace(ws_, op, acts);
    s = pyinf_cuda_eigen_correction(&acts.t, &grads.t, &qa.t, &qs.t, opt(mask), out, ws.first, ws.second,
                                    stream_ptr(stream));
  } else {
    py::gil_scoped_release nogil;
    s = pyinf_cpu_eigen_correction(&acts.t, &grads.t, &qa.t, &qs.t, opt(mask), out);
  }
  raise_status(s);
}

void self_influence(py::handle acts_, py::handle grads_, py::handle qa_, py::handle qs_, py::handle lam_,
                    double damping, py::handle mask_, py::handle out_, py::handle ws_, py::handle stream) {
  const char* op = "self_influence";
  Arg acts = read(acts_, op, "acts", 3), grads = read(grads_, op, "grads", 3);
  Arg qa = read(qa_, op, "q_a", 2), qs = read(qs_, op, "q_s", 2), lam = read(lam_, op, "lambdas", 2);
  Arg mask = read(mask_, op, "mask", 2, true, true);
  same_device(op, {{"acts", &acts}, {"grads", &grads}, {"q_a", &qa}, {"q_s", &qs}, {"lambdas", &lam}, {"mask", &mask}});
  float* out = read_out(out_, op, {acts.t.shape[0]}, acts);
  pyinf_status s;
  const float damp = static_cast<float>(damping);
  if (is_cuda(acts)) {
    require_cuda_build(op);
    auto ws = read_workspace(ws_, op, acts);
    s = pyinf_cuda_self_influence(&acts.t, &grads.t, &qa.t, &qs.t, &lam.t, damp, opt(mask), out, ws.first,
                                  ws.second, stream_ptr(stream));
  } else {
    py::gil_scoped_release nogil;
    s = pyinf_cpu_self_influence(&acts.t, &grads.t, &qa.t, &qs.t, &lam.t, damp, opt(mask), out);
  }
  raise_status(s);
}

size_t factored_workspace_size(py::handle acts_, py::handle grads_, py::handle left_, py::handle right_,
                               bool per_token, bool packed) {
  const char* op = "factored_scores_workspace_size";
  Arg acts = read(acts_, op, "acts", 3), grads = read(grads_, op, "grads", 3);
  Arg left = read(left_, op, "left", 3), right = read(right_, op, "right", 3);
  if (!is_cuda(acts)) return 0;  // the CPU path needs none
  require_cuda_build(op);
  size_t bytes = 0;
  raise_status((packed ? pyinf_cuda_factored_scores_packed_workspace_size : pyinf_cuda_factored_scores_workspace_size)(
      &acts.t, &grads.t, &left.t, &right.t, per_token ? 1 : 0, &bytes));
  return bytes;
}

// The kernel a CUDA call with a workspace of workspace_bytes runs ("sm90", "wmma", "fma").
std::string factored_kernel(py::handle acts_, py::handle grads_, py::handle left_, py::handle right_, bool per_token,
                            size_t workspace_bytes) {
  const char* op = "factored_scores_kernel";
  Arg acts = read(acts_, op, "acts", 3), grads = read(grads_, op, "grads", 3);
  Arg left = read(left_, op, "left", 3), right = read(right_, op, "right", 3);
  if (!is_cuda(acts)) return "cpu";
  require_cuda_build(op);
  const char* name = nullptr;
  raise_status(pyinf_cuda_factored_scores_kernel(&acts.t, &grads.t, &left.t, &right.t, per_token ? 1 : 0,
                                                 workspace_bytes, &name));
  return name;
}

// Bytes of the Hopper kernel's packed factors for this pair (0: it cannot take them here).
size_t factored_pack_size(py::handle left_, py::handle right_) {
  const char* op = "factored_scores_pack_size";
  Arg left = read(left_, op, "left", 3), right = read(right_, op, "right", 3);
  same_device(op, {{"left", &left}, {"right", &right}});
  if (!is_cuda(left) || !pyinf_cuda_compiled()) return 0;
  size_t bytes = 0;
  raise_status(pyinf_cuda_factored_scores_pack_size(&left.t, &right.t, &bytes));
  return bytes;
}

void factored_pack(py::handle left_, py::handle right_, py::handle packed_, py::handle stream) {
  const char* op = "factored_scores_pack";
  Arg left = read(left_, op, "left", 3), right = read(right_, op, "right", 3);
  same_device(op, {{"left", &left}, {"right", &right}});
  if (!is_cuda(left)) throw py::value_error(where(op, "left") + " must be a CUDA tensor (packing is for the Hopper kernel)");
  require_cuda_build(op);
  if (packed_.is_none()) throw py::value_error(where(op, "packed") + " is required");
  auto packed = read_workspace(packed_, op, left, "packed");
  raise_status(pyinf_cuda_factored_scores_pack(&left.t, &right.t, packed.first, packed.second, stream_ptr(stream)));
}

void factored_scores(py::handle acts_, py::handle grads_, py::handle left_, py::handle right_, py::handle mask_,
                     bool per_token, py::handle out_, py::handle ws_, py::handle stream, py::handle packed_) {
  const char* op = "factored_scores";
  Arg acts = read(acts_, op, "acts", 3), grads = read(grads_, op, "grads", 3);
  Arg left = read(left_, op, "left", 3), right = read(right_, op, "right", 3);
  Arg mask = read(mask_, op, "mask", 2, true, true);
  same_device(op, {{"acts", &acts}, {"grads", &grads}, {"left", &left}, {"right", &right}, {"mask", &mask}});
  std::vector<int64_t> shape = per_token ? std::vector<int64_t>{acts.t.shape[0], acts.t.shape[1], left.t.shape[0]}
                                         : std::vector<int64_t>{acts.t.shape[0], left.t.shape[0]};
  float* out = read_out(out_, op, shape, acts);
  pyinf_status s;
  if (is_cuda(acts)) {
    require_cuda_build(op);
    auto ws = read_workspace(ws_, op, acts);
    auto packed = read_workspace(packed_, op, acts, "packed");
    s = pyinf_cuda_factored_scores_split_packed(&acts.t, &grads.t, &left.t, &right.t, packed.first, packed.second,
                                                opt(mask), per_token ? 1 : 0, out, ws.first, ws.second,
                                                stream_ptr(stream));
  } else {
    py::gil_scoped_release nogil;
    s = pyinf_cpu_factored_scores(&acts.t, &grads.t, &left.t, &right.t, opt(mask), per_token ? 1 : 0, out);
  }
  raise_status(s);
}

// The problems of a grouped call: a sequence of (acts, grads, left, right[, mask, out])
// tuples, all tensors on one device. `args` owns the pyinf_tensors the problems point to.
struct Group {
  std::vector<Arg> args;
  std::vector<pyinf_factored_problem> problems;
};

Group read_group(py::handle seq, const char* op, bool with_outputs, bool per_token) {
  Group g;
  if (!py::isinstance<py::list>(seq) && !py::isinstance<py::tuple>(seq))
    throw py::type_error(std::string("pyinf._C.") + op + ": problems must be a list of (acts, grads, left, right" +
                         (with_outputs ? ", mask, out" : "") + ") tuples, got " +
                         std::string(py::str(py::type::of(seq).attr("__name__"))));
  const size_t count = py::len(seq);
  if (count > 0x7fffffff) throw py::value_error(std::string("pyinf._C.") + op + ": too many problems");
  const size_t fields = with_outputs ? 6 : 4;
  g.args.reserve(count * 5);  // stable addresses for the problems' pointers
  size_t i = 0;
  for (py::handle item : seq) {
    const std::string at = "problems[" + std::to_string(i++) + "].";
    if (!py::isinstance<py::tuple>(item) && !py::isinstance<py::list>(item))  // a tensor is a sequence too
      throw py::type_error(std::string("pyinf._C.") + op + ": " + at.substr(0, at.size() - 1) +
                           " must be a tuple of tensors, got " +
                           std::string(py::str(py::type::of(item).attr("__name__"))));
    py::tuple t = py::reinterpret_borrow<py::object>(item).cast<py::tuple>();
    if (t.size() != fields)
      throw py::value_error(std::string("pyinf._C.") + op + ": " + at.substr(0, at.size() - 1) + " must have " +
                            std::to_string(fields) + " entries, got " + std::to_string(t.size()));
    const std::string names[5] = {at + "acts", at + "grads", at + "left", at + "right", at + "mask"};
    const size_t first = g.args.size();
    for (int k = 0; k < 4; ++k) g.args.push_back(read(t[k], op, names[k].c_str(), 3));
    g.args.push_back(with_outputs ? read(t[4], op, names[4].c_str(), 2, true, true) : Arg{});
    const Arg* a = &g.args[first];
    same_device(op, {{names[0].c_str(), &a[0]}, {names[1].c_str(), &a[1]}, {names[2].c_str(), &a[2]},
                     {names[3].c_str(), &a[3]}, {names[4].c_str(), &a[4]}});
    if (a[0].device_type != g.args[0].device_type || a[0].device_index != g.args[0].device_index)
      throw py::value_error(std::string("pyinf._C.") + op + ": all problems must be on one device; '" + names[0] +
                            "' is on " + a[0].device_type + ":" + std::to_string(a[0].device_index) +
                            ", 'problems[0].acts' on " + g.args[0].device_type + ":" +
                            std::to_string(g.args[0].device_index));
    pyinf_factored_problem p{&a[0].t, &a[1].t, &a[2].t, &a[3].t, opt(a[4]), nullptr};
    if (with_outputs) {
      const std::vector<int64_t> shape = per_token
                                             ? std::vector<int64_t>{a[0].t.shape[0], a[0].t.shape[1], a[2].t.shape[0]}
                                             : std::vector<int64_t>{a[0].t.shape[0], a[2].t.shape[0]};
      const std::string out_name = at + "out";
      p.out = read_out(t[5], op, shape, a[0], out_name.c_str());
    }
    g.problems.push_back(p);
  }
  return g;
}

size_t factored_grouped_workspace_size(py::handle problems, bool per_token) {
  const char* op = "factored_scores_grouped_workspace_size";
  Group g = read_group(problems, op, false, per_token);
  if (g.problems.empty() || !is_cuda(g.args[0])) return 0;  // the CPU path needs none
  require_cuda_build(op);
  size_t bytes = 0;
  raise_status(pyinf_cuda_factored_scores_grouped_workspace_size(g.problems.data(), static_cast<int>(g.problems.size()),
                                                                 per_token ? 1 : 0, &bytes));
  return bytes;
}

void factored_scores_grouped(py::handle problems, bool per_token, py::handle ws_, py::handle stream) {
  const char* op = "factored_scores_grouped";
  Group g = read_group(problems, op, true, per_token);
  if (g.problems.empty()) return;
  const int count = static_cast<int>(g.problems.size());
  pyinf_status s;
  if (is_cuda(g.args[0])) {
    require_cuda_build(op);
    auto ws = read_workspace(ws_, op, g.args[0]);
    s = pyinf_cuda_factored_scores_grouped(g.problems.data(), count, per_token ? 1 : 0, ws.first, ws.second,
                                           stream_ptr(stream));
  } else {
    py::gil_scoped_release nogil;
    s = pyinf_cpu_factored_scores_grouped(g.problems.data(), count, per_token ? 1 : 0);
  }
  raise_status(s);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyinf native backend (C API over raw pointers; no torch C++ ABI dependency)";
  m.def("api_version", &pyinf_api_version);
  m.def("cuda_compiled", []() { return pyinf_cuda_compiled() != 0; },
        "True when the CUDA kernels were compiled into this build");
  m.def("cuda_archs", []() { return std::string(pyinf_cuda_archs()); });
  m.def("cuda_sm90_compiled", []() { return pyinf_cuda_sm90_compiled() != 0; },
        "True when the Hopper factored-scores kernel (TMA + wgmma) was compiled into this build");
  m.def("status_string", [](int s) { return std::string(pyinf_status_string(static_cast<pyinf_status>(s))); });
  m.def("covariance", &covariance, py::arg("x"), py::arg("mask"), py::arg("out"), py::arg("stream") = py::none());
  m.def("eigen_correction_workspace_size",
        [](py::handle a, py::handle g) { return rotated_workspace_size(a, g, false); });
  m.def("self_influence_workspace_size", [](py::handle a, py::handle g) { return rotated_workspace_size(a, g, true); });
  m.def("eigen_correction", &eigen_correction, py::arg("acts"), py::arg("grads"), py::arg("q_a"), py::arg("q_s"),
        py::arg("mask"), py::arg("out"), py::arg("workspace") = py::none(), py::arg("stream") = py::none());
  m.def("self_influence", &self_influence, py::arg("acts"), py::arg("grads"), py::arg("q_a"), py::arg("q_s"),
        py::arg("lambdas"), py::arg("damping"), py::arg("mask"), py::arg("out"), py::arg("workspace") = py::none(),
        py::arg("stream") = py::none());
  m.def("factored_scores_workspace_size", &factored_workspace_size, py::arg("acts"), py::arg("grads"),
        py::arg("left"), py::arg("right"), py::arg("per_token"), py::arg("packed") = false,
        "Workspace bytes of a CUDA call (packed: with packed factors given, see factored_scores_pack)");
  m.def("factored_scores_kernel", &factored_kernel, py::arg("acts"), py::arg("grads"), py::arg("left"),
        py::arg("right"), py::arg("per_token"), py::arg("workspace_bytes"));
  m.def("factored_scores", &factored_scores, py::arg("acts"), py::arg("grads"), py::arg("left"), py::arg("right"),
        py::arg("mask"), py::arg("per_token"), py::arg("out"), py::arg("workspace") = py::none(),
        py::arg("stream") = py::none(), py::arg("packed") = py::none());
  m.def("factored_scores_grouped_workspace_size", &factored_grouped_workspace_size, py::arg("problems"),
        py::arg("per_token"), "Workspace bytes of a grouped CUDA call; problems: (acts, grads, left, right) tuples");
  m.def("factored_scores_grouped", &factored_scores_grouped, py::arg("problems"), py::arg("per_token"),
        py::arg("workspace") = py::none(), py::arg("stream") = py::none(),
        "Several layers' factored scores, on CUDA in one launch per 16 layers and kernel; problems: (acts, grads, "
        "left, right, mask or None, out) tuples of tensors on one device");
  m.def("factored_scores_pack_size", &factored_pack_size, py::arg("left"), py::arg("right"),
        "Bytes of the Hopper kernel's packed query factors for this pair (0 where it cannot take them)");
  m.def("factored_scores_pack", &factored_pack, py::arg("left"), py::arg("right"), py::arg("packed"),
        py::arg("stream") = py::none());
}
