// The OpSpec of one lowered op from the Python tuples hotloop.capture produces.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "engine/op_spec.h"

namespace hotloop {

// `args` holds one tuple per schema argument: ("slot", i), ("const", python value), ("default",) or
// ("list", [i or None, ...]). Constants are converted to the schema's argument types here, once.
OpSpec op_spec_from_python(const std::string& name, const std::string& overload, const pybind11::list& args,
                           std::vector<int64_t> results, std::vector<int64_t> release, int64_t unpacked_list_size);

}  // namespace hotloop
