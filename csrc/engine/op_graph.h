// OpGraph: a captured joint forward+backward graph lowered to a flat list of dispatcher calls.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/ivalue.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "engine/op_spec.h"

namespace hotloop {

// Every value lives in a numbered slot: the graph's inputs first, then constants and op results. An op
// reads its arguments from slots or baked-in constants, writes its results to slots and clears the
// slots whose last reader it is, so intermediates are freed as early as an eager run frees them.
class OpGraph {
 public:
  explicit OpGraph(int64_t num_inputs);

  // Grows the slot table to hold `count` slots (inputs included).
  void reserve_slots(int64_t count);
  // A tensor the graph reads but never receives as an input (a constant captured from the model).
  void set_constant(int64_t slot, at::Tensor value);
  // Appends a call of `op.name`.`op.overload`, resolving its schema and checking the arguments against it.
  void add_op(const OpSpec& op);
  // `copy[i]`: output i may alias an input (a view of a batch tensor or parameter) and is returned as a
  // fresh copy, so callers may keep or update it like a gradient eager autograd made.
  void set_outputs(std::vector<int64_t> slots, std::vector<bool> copy);
  // Op `index` (one Tensor return, read only inside the graph) keeps the tensor its first run returned
  // and from then on writes into it through `out_overload`, its out= variant (the op's arguments, then
  // the output): no allocation per run. Memory the first run returned that shares an input's storage
  // is not kept.
  void reuse_output(int64_t index, const std::string& out_overload);

  int64_t num_inputs() const { return num_inputs_; }
  int64_t num_outputs() const { return static_cast<int64_t>(outputs_.size()); }

  // Inputs stay bound across runs until replaced (parameters and buffers are bound once).
  void bind_input(int64_t index, const at::Tensor& value);
  // Runs every op below autograd (no graph is recorded) and puts the graph's outputs into `outputs`
  // (resized; the caller decides how long they live).
  void run(std::vector<at::Tensor>& outputs);

  // Binds `inputs`, runs, returns the outputs and unbinds everything (for checks).
  std::vector<at::Tensor> call(const std::vector<at::Tensor>& inputs);
  std::vector<std::string> op_names() const;
  // The ops that write into a kept output (reuse_output), by name.
  std::vector<std::string> reused_ops() const;

 private:
  enum class ArgKind : uint8_t { Slot, Constant, TensorList, OptionalTensorList };
  struct Arg {
    ArgKind kind;
    int64_t slot = -1;
    c10::IValue constant;
    std::vector<int64_t> list;  // slots, -1 for None (OptionalTensorList only)
  };
  struct Op {
    c10::OperatorHandle handle;
    std::string name;
    std::vector<Arg> args;
    std::vector<int64_t> results;
    std::vector<int64_t> release;
    int64_t unpacked_list_size = -1;
    std::optional<c10::OperatorHandle> out_handle;  // set by reuse_output
    at::Tensor output;                               // what out_handle writes into, once known
  };

  void check_slot(int64_t slot, const char* what) const;
  void keep_output(Op& op, const std::vector<c10::IValue>& stack);
  Arg resolve_arg(const std::string& op_name, const c10::Argument& formal, const OpArg& given) const;

  int64_t num_inputs_;
  std::vector<c10::IValue> slots_;
  std::vector<bool> pinned_;  // inputs and constants are never released by ops
  std::vector<Op> ops_;
  std::vector<int64_t> outputs_;
  std::vector<bool> copy_outputs_;
  std::vector<c10::IValue> stack_;
};

}  // namespace hotloop
