// OpGraph: resolves each op's schema once, converts constants once, then runs the list with one reused stack.
#include "engine/op_graph.h"

#include <ATen/ScalarOps.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/csrc/jit/python/pybind_utils.h>
#include <torch/csrc/utils/pybind.h>

namespace hotloop {
namespace py = pybind11;

OpGraph::OpGraph(int64_t num_inputs) : num_inputs_(num_inputs) {
  TORCH_CHECK(num_inputs >= 0, "OpGraph needs a non-negative input count, got ", num_inputs);
  reserve_slots(num_inputs);
}

void OpGraph::reserve_slots(int64_t count) {
  TORCH_CHECK(count >= static_cast<int64_t>(slots_.size()), "OpGraph slots can only grow");
  slots_.resize(count);
  pinned_.resize(count, false);
  for (int64_t i = 0; i < num_inputs_ && i < count; ++i) pinned_[i] = true;
}

void OpGraph::check_slot(int64_t slot, const char* what) const {
  TORCH_CHECK(slot >= 0 && slot < static_cast<int64_t>(slots_.size()), what, " slot ", slot,
              " is out of range (the graph has ", slots_.size(), " slots)");
}

void OpGraph::set_constant(int64_t slot, at::Tensor value) {
  check_slot(slot, "constant");
  TORCH_CHECK(slot >= num_inputs_, "slot ", slot, " is an input, not a constant");
  slots_[slot] = std::move(value);
  pinned_[slot] = true;
}

void OpGraph::add_op(const std::string& name, const std::string& overload, const py::list& args,
                     std::vector<int64_t> results, std::vector<int64_t> release, int64_t unpacked_list_size) {
  auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), overload.c_str());
  const auto& schema = handle.schema();
  const auto& formals = schema.arguments();
  TORCH_CHECK(args.size() == formals.size(), name, ".", overload, " takes ", formals.size(),
              " arguments, the lowered graph gives ", args.size());
  Op op{handle, name + "." + overload, {}, std::move(results), std::move(release), unpacked_list_size};
  op.args.reserve(formals.size());
  for (size_t i = 0; i < formals.size(); ++i) {
    const auto& formal = formals[i];
    auto entry = args[i].cast<py::tuple>();
    TORCH_CHECK(entry.size() >= 1, op.name, ": argument '", formal.name(), "' has an empty description");
    const auto kind = entry[0].cast<std::string>();
    Arg arg;
    if (kind == "slot") {
      arg.kind = ArgKind::Slot;
      arg.slot = entry[1].cast<int64_t>();
      check_slot(arg.slot, "argument");
    } else if (kind == "const") {
      arg.kind = ArgKind::Constant;
      const bool tensor_formal = formal.type()->kind() == c10::TypeKind::TensorType;
      const auto value = entry[1];
      try {
        if (tensor_formal && (py::isinstance<py::bool_>(value) || py::isinstance<py::int_>(value) ||
                              py::isinstance<py::float_>(value))) {
          // A Python number where a Tensor goes: wrap it the way torch's argument parser does, so type
          // promotion treats it as a scalar.
          at::Tensor wrapped = at::scalar_to_tensor(torch::jit::toIValue(value, c10::NumberType::get()).toScalar());
          wrapped.unsafeGetTensorImpl()->set_wrapped_number(true);
          arg.constant = std::move(wrapped);
        } else {
          arg.constant = torch::jit::toIValue(value, formal.type());
        }
      } catch (const std::exception& e) {
        TORCH_CHECK(false, op.name, ": cannot pass ", std::string(py::repr(entry[1])), " as argument '",
                    formal.name(), "' of type ", formal.type()->str(), ": ", e.what());
      }
    } else if (kind == "default") {
      TORCH_CHECK(formal.default_value().has_value(), op.name, ": argument '", formal.name(),
                  "' has no default value");
      arg.kind = ArgKind::Constant;
      arg.constant = *formal.default_value();
    } else if (kind == "list") {
      auto list_type = formal.type()->cast<c10::ListType>();
      TORCH_CHECK(list_type != nullptr, op.name, ": argument '", formal.name(), "' of type ",
                  formal.type()->str(), " cannot take a list of tensors");
      const auto element = list_type->getElementType();
      if (element->kind() == c10::TypeKind::TensorType) {
        arg.kind = ArgKind::TensorList;
      } else if (element->kind() == c10::TypeKind::OptionalType &&
                 element->castRaw<c10::OptionalType>()->getElementType()->kind() == c10::TypeKind::TensorType) {
        arg.kind = ArgKind::OptionalTensorList;
      } else {
        TORCH_CHECK(false, op.name, ": argument '", formal.name(), "' of type ", formal.type()->str(),
                    " cannot take a list of tensors");
      }
      for (auto item : entry[1].cast<py::list>()) {
        if (item.is_none()) {
          TORCH_CHECK(arg.kind == ArgKind::OptionalTensorList, op.name, ": argument '", formal.name(),
                      "' cannot hold None");
          arg.list.push_back(-1);
        } else {
          arg.list.push_back(item.cast<int64_t>());
          check_slot(arg.list.back(), "list element");
        }
      }
    } else {
      TORCH_CHECK(false, op.name, ": unknown argument kind '", kind, "'");
    }
    op.args.push_back(std::move(arg));
  }
  const auto& returns = schema.returns();
  if (op.unpacked_list_size >= 0) {
    TORCH_CHECK(returns.size() == 1 && op.results.size() == 1, op.name,
                ": only a single Tensor[] return can be unpacked");
    if (op.results[0] >= 0) check_slot(op.results[0] + std::max<int64_t>(op.unpacked_list_size - 1, 0), "result");
  } else {
    TORCH_CHECK(op.results.size() == returns.size(), op.name, " returns ", returns.size(),
                " values, the lowered graph names ", op.results.size());
    for (auto slot : op.results)
      if (slot >= 0) check_slot(slot, "result");
  }
  for (auto slot : op.release) check_slot(slot, "released");
  ops_.push_back(std::move(op));
}

void OpGraph::set_outputs(std::vector<int64_t> slots, std::vector<bool> copy) {
  for (auto slot : slots) check_slot(slot, "output");
  TORCH_CHECK(copy.size() == slots.size(), "set_outputs needs one copy flag per output");
  outputs_ = std::move(slots);
  copy_outputs_ = std::move(copy);
}

void OpGraph::bind_input(int64_t index, const at::Tensor& value) {
  TORCH_CHECK(index >= 0 && index < num_inputs_, "input ", index, " is out of range (the graph has ",
              num_inputs_, " inputs)");
  slots_[index] = value;
}

void OpGraph::run() {
  // Below autograd: the graph already holds the backward ops, so nothing may be recorded.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto& stack = stack_;
  for (const auto& op : ops_) {
    stack.clear();
    for (const auto& arg : op.args) {
      switch (arg.kind) {
        case ArgKind::Slot:
          stack.push_back(slots_[arg.slot]);
          break;
        case ArgKind::Constant:
          stack.push_back(arg.constant);
          break;
        case ArgKind::TensorList: {
          c10::List<at::Tensor> list;
          list.reserve(arg.list.size());
          for (auto slot : arg.list) list.push_back(slots_[slot].toTensor());
          stack.emplace_back(std::move(list));
          break;
        }
        case ArgKind::OptionalTensorList: {
          c10::List<std::optional<at::Tensor>> list;
          list.reserve(arg.list.size());
          for (auto slot : arg.list) {
            if (slot < 0) {
              list.push_back(std::nullopt);
            } else {
              list.push_back(slots_[slot].toTensor());
            }
          }
          stack.emplace_back(std::move(list));
          break;
        }
      }
    }
    op.handle.callBoxed(stack);
    if (op.unpacked_list_size >= 0) {
      if (op.results[0] >= 0) {
        auto list = stack[0].toTensorList();
        TORCH_CHECK(static_cast<int64_t>(list.size()) == op.unpacked_list_size, op.name, " returned ",
                    list.size(), " tensors, the captured graph had ", op.unpacked_list_size);
        for (int64_t j = 0; j < op.unpacked_list_size; ++j) slots_[op.results[0] + j] = list.get(j);
      }
    } else {
      for (size_t j = 0; j < op.results.size(); ++j)
        if (op.results[j] >= 0) slots_[op.results[j]] = std::move(stack[j]);
    }
    for (auto slot : op.release) slots_[slot] = c10::IValue();
  }
  stack.clear();
  output_values_.resize(outputs_.size());
  for (size_t i = 0; i < outputs_.size(); ++i) {
    const auto& value = slots_[outputs_[i]];
    TORCH_CHECK(value.isTensor(), "graph output ", i, " is not a tensor");
    output_values_[i] = copy_outputs_[i] ? value.toTensor().clone() : value.toTensor();
  }
  for (auto slot : outputs_)
    if (!pinned_[slot]) slots_[slot] = c10::IValue();
}

const at::Tensor& OpGraph::output(int64_t index) const {
  TORCH_CHECK(index >= 0 && index < static_cast<int64_t>(output_values_.size()), "output ", index,
              " is out of range (", output_values_.size(), " outputs after the last run)");
  return output_values_[index];
}

void OpGraph::release_outputs() { output_values_.clear(); }

std::vector<at::Tensor> OpGraph::call(const std::vector<at::Tensor>& inputs) {
  TORCH_CHECK(static_cast<int64_t>(inputs.size()) == num_inputs_, "the graph takes ", num_inputs_,
              " inputs, got ", inputs.size());
  for (int64_t i = 0; i < num_inputs_; ++i) slots_[i] = inputs[i];
  try {
    run();
  } catch (...) {
    for (int64_t i = 0; i < static_cast<int64_t>(slots_.size()); ++i)
      if (i < num_inputs_ || !pinned_[i]) slots_[i] = c10::IValue();
    throw;
  }
  std::vector<at::Tensor> result = std::move(output_values_);
  output_values_.clear();
  for (int64_t i = 0; i < num_inputs_; ++i) slots_[i] = c10::IValue();
  return result;
}

std::vector<std::string> OpGraph::op_names() const {
  std::vector<std::string> names;
  names.reserve(ops_.size());
  for (const auto& op : ops_) names.push_back(op.name);
  return names;
}

}  // namespace hotloop
