// OpGraph: a captured joint forward+backward graph lowered to a flat list of dispatcher calls.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/ivalue.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

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
  // Appends a call of `name.overload` (e.g. "aten::addmm", "default"). `args` holds one entry per schema
  // argument, each a tuple: ("slot", i), ("const", python value), ("default",) or ("list", [i or None, ...]).
  // `results` names the slot of each return (-1 drops it); a Tensor[] return is unpacked into
  // consecutive slots starting at its entry. `release` lists the slots read for the last time here.
  void add_op(const std::string& name, const std::string& overload, const pybind11::list& args,
              std::vector<int64_t> results, std::vector<int64_t> release, int64_t unpacked_list_size);
  // `copy[i]`: output i may alias an input (a view of a batch tensor or parameter) and is returned as a
  // fresh copy, so callers may keep or update it like a gradient eager autograd made.
  void set_outputs(std::vector<int64_t> slots, std::vector<bool> copy);

  int64_t num_inputs() const { return num_inputs_; }
  int64_t num_ops() const { return static_cast<int64_t>(ops_.size()); }
  int64_t num_outputs() const { return static_cast<int64_t>(outputs_.size()); }

  // Inputs stay bound across runs until replaced (parameters and buffers are bound once).
  void bind_input(int64_t index, const at::Tensor& value);
  // Runs every op below autograd (no graph is recorded) and leaves the outputs readable by output().
  // Needs no GIL.
  void run();
  const at::Tensor& output(int64_t index) const;
  // Drops the references the last run still holds (outputs and anything bound as input).
  void release_outputs();

  // For checks from Python: binds `inputs`, runs, returns the outputs and unbinds everything.
  std::vector<at::Tensor> call(const std::vector<at::Tensor>& inputs);
  std::vector<std::string> op_names() const;

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
    int64_t unpacked_list_size = -1;  // >= 0: the single Tensor[] return is spread over slots
  };

  void check_slot(int64_t slot, const char* what) const;

  int64_t num_inputs_;
  std::vector<c10::IValue> slots_;
  std::vector<bool> pinned_;  // inputs and constants are never released by ops
  std::vector<Op> ops_;
  std::vector<int64_t> outputs_;
  std::vector<bool> copy_outputs_;
  std::vector<at::Tensor> output_values_;
  std::vector<c10::IValue> stack_;
};

}  // namespace hotloop
