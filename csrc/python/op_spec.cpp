// op_spec_from_python: parses the tuple format and converts Python constants with torch's own converter.
#include "python/op_spec.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/jit/python/pybind_utils.h>
#include <torch/csrc/utils/pybind.h>

namespace hotloop {
namespace py = pybind11;

namespace {

c10::IValue constant_from_python(const std::string& op_name, const c10::Argument& formal, const py::handle& value) {
  try {
    if (formal.type()->kind() == c10::TypeKind::TensorType &&
        (py::isinstance<py::bool_>(value) || py::isinstance<py::int_>(value) || py::isinstance<py::float_>(value))) {
      // A number where a Tensor goes: OpGraph wraps it as torch's argument parser does.
      return torch::jit::toIValue(value, c10::NumberType::get());
    }
    return torch::jit::toIValue(value, formal.type());
  } catch (const std::exception& e) {
    TORCH_CHECK(false, op_name, ": cannot pass ", std::string(py::repr(value)), " as argument '", formal.name(),
                "' of type ", formal.type()->str(), ": ", e.what());
  }
}

}  // namespace

OpSpec op_spec_from_python(const std::string& name, const std::string& overload, const py::list& args,
                           std::vector<int64_t> results, std::vector<int64_t> release, int64_t unpacked_list_size) {
  const auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), overload.c_str());
  const auto& formals = handle.schema().arguments();
  const std::string op_name = name + "." + overload;
  TORCH_CHECK(args.size() == formals.size(), op_name, " takes ", formals.size(),
              " arguments, the lowered graph gives ", args.size());
  OpSpec spec{name, overload, {}, std::move(results), std::move(release), unpacked_list_size};
  spec.args.reserve(formals.size());
  for (size_t i = 0; i < formals.size(); ++i) {
    const auto& formal = formals[i];
    auto entry = args[i].cast<py::tuple>();
    TORCH_CHECK(entry.size() >= 1, op_name, ": argument '", formal.name(),
                "' has an empty description (expected ('slot', i), ('const', value), ('default',) or ('list', [...]))");
    const auto kind = entry[0].cast<std::string>();
    TORCH_CHECK(kind == "default" || entry.size() == 2, op_name, ": argument '", formal.name(), "' of kind '", kind,
                "' needs exactly one value");
    if (kind == "slot") {
      spec.args.push_back(OpArg::of_slot(entry[1].cast<int64_t>()));
    } else if (kind == "const") {
      spec.args.push_back(OpArg::of_constant(constant_from_python(op_name, formal, entry[1])));
    } else if (kind == "default") {
      spec.args.push_back(OpArg::of_default());
    } else if (kind == "list") {
      std::vector<int64_t> slots;
      for (auto item : entry[1].cast<py::list>()) slots.push_back(item.is_none() ? -1 : item.cast<int64_t>());
      spec.args.push_back(OpArg::of_list(std::move(slots)));
    } else {
      TORCH_CHECK(false, op_name, ": unknown argument kind '", kind, "' (expected 'slot', 'const', 'default' or 'list')");
    }
  }
  return spec;
}

}  // namespace hotloop
