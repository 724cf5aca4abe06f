// OpSpec: one dispatcher call of a lowered graph as typed data, the format OpGraph is built from.
#pragma once

#include <ATen/core/ivalue.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace hotloop {

// One argument of an op, in the order of the op's schema.
struct OpArg {
  enum class Kind : uint8_t {
    Slot,        // the value held in `slot`
    Constant,    // `constant`, of the schema's type (a number where a Tensor goes is wrapped as torch's parser does)
    Default,     // the schema's default value
    TensorList,  // a Tensor[] or Tensor?[] gathered from the slots in `list` (-1: None, Tensor?[] only)
  };
  Kind kind = Kind::Default;
  int64_t slot = -1;
  std::vector<int64_t> list;
  c10::IValue constant;

  static OpArg of_slot(int64_t slot) {
    OpArg arg;
    arg.kind = Kind::Slot;
    arg.slot = slot;
    return arg;
  }
  static OpArg of_constant(c10::IValue value) {
    OpArg arg;
    arg.kind = Kind::Constant;
    arg.constant = std::move(value);
    return arg;
  }
  static OpArg of_default() { return OpArg(); }
  static OpArg of_list(std::vector<int64_t> slots) {
    OpArg arg;
    arg.kind = Kind::TensorList;
    arg.list = std::move(slots);
    return arg;
  }
};

struct OpSpec {
  std::string name;      // e.g. "aten::addmm"
  std::string overload;  // e.g. "out", or "" for the default overload
  std::vector<OpArg> args;        // one per schema argument
  std::vector<int64_t> results;   // the slot of each return, -1 drops it
  std::vector<int64_t> release;   // slots read for the last time by this op
  // >= 0: the op's single Tensor[] return is spread over this many consecutive slots from results[0]
  int64_t unpacked_list_size = -1;
};

}  // namespace hotloop
