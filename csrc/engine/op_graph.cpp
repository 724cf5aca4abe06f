// OpGraph: resolves each op's schema once, checks its arguments once, then runs the list with one reused stack.
#include "engine/op_graph.h"

#include <ATen/ScalarOps.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <algorithm>

namespace hotloop {

OpGraph::OpGraph(int64_t num_inputs) : num_inputs_(num_inputs) {
  TORCH_CHECK(num_inputs >= 0, "OpGraph needs a non-negative input count, got ", num_inputs);
  reserve_slots(num_inputs);
}

void OpGraph::reserve_slots(int64_t count) {
  TORCH_CHECK(count >= static_cast<int64_t>(slots_.size()), "OpGraph slots can only grow: it has ",
              slots_.size(), ", asked for ", count);
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

OpGraph::Arg OpGraph::resolve_arg(const std::string& op_name, const c10::Argument& formal,
                                  const OpArg& given) const {
  Arg arg;
  switch (given.kind) {
    case OpArg::Kind::Slot:
      arg.kind = ArgKind::Slot;
      arg.slot = given.slot;
      check_slot(arg.slot, "argument");
      break;
    case OpArg::Kind::Constant:
      arg.kind = ArgKind::Constant;
      arg.constant = given.constant;
      if (formal.type()->kind() == c10::TypeKind::TensorType && given.constant.isScalar()) {
        // A number where a Tensor goes: wrapped as torch's argument parser wraps it, so type promotion
        // treats it as a scalar.
        at::Tensor wrapped = at::scalar_to_tensor(given.constant.toScalar());
        wrapped.unsafeGetTensorImpl()->set_wrapped_number(true);
        arg.constant = std::move(wrapped);
      }
      break;
    case OpArg::Kind::Default:
      TORCH_CHECK(formal.default_value().has_value(), op_name, ": argument '", formal.name(),
                  "' has no default value");
      arg.kind = ArgKind::Constant;
      arg.constant = *formal.default_value();
      break;
    case OpArg::Kind::TensorList: {
      auto list_type = formal.type()->cast<c10::ListType>();
      TORCH_CHECK(list_type != nullptr, op_name, ": argument '", formal.name(), "' of type ", formal.type()->str(),
                  " cannot take a list of tensors");
      const auto element = list_type->getElementType();
      if (element->kind() == c10::TypeKind::TensorType) {
        arg.kind = ArgKind::TensorList;
      } else if (element->kind() == c10::TypeKind::OptionalType &&
                 element->castRaw<c10::OptionalType>()->getElementType()->kind() == c10::TypeKind::TensorType) {
        arg.kind = ArgKind::OptionalTensorList;
      } else {
        TORCH_CHECK(false, op_name, ": argument '", formal.name(), "' of type ", formal.type()->str(),
                    " cannot take a list of tensors");
      }
      for (auto slot : given.list) {
        if (slot < 0) {
          TORCH_CHECK(arg.kind == ArgKind::OptionalTensorList, op_name, ": argument '", formal.name(),
                      "' of type ", formal.type()->str(), " cannot hold None");
        } else {
          check_slot(slot, "list element");
        }
      }
      arg.list = given.list;
      break;
    }
  }
  return arg;
}

void OpGraph::add_op(const OpSpec& spec) {
  auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(spec.name.c_str(), spec.overload.c_str());
  const auto& schema = handle.schema();
  const auto& formals = schema.arguments();
  Op op{handle, spec.name + "." + spec.overload, {}, spec.results, spec.release, spec.unpacked_list_size};
  TORCH_CHECK(spec.args.size() == formals.size(), op.name, " takes ", formals.size(),
              " arguments, the lowered graph gives ", spec.args.size());
  op.args.reserve(formals.size());
  for (size_t i = 0; i < formals.size(); ++i) op.args.push_back(resolve_arg(op.name, formals[i], spec.args[i]));
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
  TORCH_CHECK(copy.size() == slots.size(), "set_outputs needs one copy flag per output: ", slots.size(),
              " outputs, ", copy.size(), " flags");
  outputs_ = std::move(slots);
  copy_outputs_ = std::move(copy);
}

void OpGraph::reuse_output(int64_t index, const std::string& out_overload) {
  TORCH_CHECK(index >= 0 && index < static_cast<int64_t>(ops_.size()), "reuse_output: op ", index,
              " is out of range (the graph has ", ops_.size(), " ops)");
  Op& op = ops_[index];
  const auto& schema = op.handle.schema();
  TORCH_CHECK(op.unpacked_list_size < 0 && op.results.size() == 1 && schema.returns().size() == 1 &&
                  schema.returns()[0].type()->kind() == c10::TypeKind::TensorType,
              op.name, ": only an op with one Tensor return can reuse its output");
  const auto name = schema.operator_name().name;
  auto out = c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), out_overload.c_str());
  const auto& formals = schema.arguments();
  const auto& out_formals = out.schema().arguments();
  TORCH_CHECK(out_formals.size() == formals.size() + 1, name, ".", out_overload, " does not take ", op.name,
              "'s arguments and one output");
  for (size_t i = 0; i < formals.size(); ++i)
    TORCH_CHECK(*out_formals[i].type() == *formals[i].type(), name, ".", out_overload, ": argument ", i,
                " has type ", out_formals[i].type()->str(), ", ", op.name, " takes ", formals[i].type()->str());
  const auto* alias = out_formals.back().alias_info();
  TORCH_CHECK(alias != nullptr && alias->isWrite() && out_formals.back().type()->kind() == c10::TypeKind::TensorType,
              name, ".", out_overload, ": its last argument is not a Tensor it writes");
  op.out_handle = out;
  op.output = at::Tensor();
}

void OpGraph::bind_input(int64_t index, const at::Tensor& value) {
  TORCH_CHECK(index >= 0 && index < num_inputs_, "input ", index, " is out of range (the graph has ",
              num_inputs_, " inputs)");
  slots_[index] = value;
}

void OpGraph::run(std::vector<at::Tensor>& outputs) {
  // Below autograd: the graph already holds the backward ops, so nothing may be recorded.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto& stack = stack_;
  for (auto& op : ops_) {
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
    if (op.output.defined()) {
      stack.emplace_back(op.output);
      op.out_handle->callBoxed(stack);
    } else {
      op.handle.callBoxed(stack);
      if (op.out_handle) keep_output(op, stack);
    }
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
  outputs.resize(outputs_.size());
  for (size_t i = 0; i < outputs_.size(); ++i) {
    const auto& value = slots_[outputs_[i]];
    TORCH_CHECK(value.isTensor(), "graph output ", i, " is not a tensor");
    outputs[i] = copy_outputs_[i] ? value.toTensor().clone() : value.toTensor();
  }
  for (auto slot : outputs_)
    if (!pinned_[slot]) slots_[slot] = c10::IValue();
}

void OpGraph::keep_output(Op& op, const std::vector<c10::IValue>& stack) {
  // The arguments are still in slots_: an output that shares an input's memory is not the op's own.
  const at::Tensor& result = stack[0].toTensor();
  for (const auto& arg : op.args) {
    if (arg.kind != ArgKind::Slot || !slots_[arg.slot].isTensor()) continue;
    const at::Tensor& input = slots_[arg.slot].toTensor();
    if (input.defined() && input.storage().is_alias_of(result.storage())) {
      op.out_handle.reset();
      return;
    }
  }
  op.output = result;
}

std::vector<at::Tensor> OpGraph::call(const std::vector<at::Tensor>& inputs) {
  TORCH_CHECK(static_cast<int64_t>(inputs.size()) == num_inputs_, "the graph takes ", num_inputs_,
              " inputs, got ", inputs.size());
  for (int64_t i = 0; i < num_inputs_; ++i) slots_[i] = inputs[i];
  std::vector<at::Tensor> outputs;
  try {
    run(outputs);
  } catch (...) {
    for (int64_t i = 0; i < static_cast<int64_t>(slots_.size()); ++i)
      if (i < num_inputs_ || !pinned_[i]) slots_[i] = c10::IValue();
    throw;
  }
  for (int64_t i = 0; i < num_inputs_; ++i) slots_[i] = c10::IValue();
  return outputs;
}

std::vector<std::string> OpGraph::op_names() const {
  std::vector<std::string> names;
  names.reserve(ops_.size());
  for (const auto& op : ops_) names.push_back(op.name);
  return names;
}

std::vector<std::string> OpGraph::reused_ops() const {
  std::vector<std::string> names;
  for (const auto& op : ops_)
    if (op.out_handle) names.push_back(op.name);
  return names;
}

}  // namespace hotloop
