// SignalCheck: lets a C++ loop that runs without the GIL honour Ctrl-C within a few milliseconds.
#pragma once

#include <pybind11/pybind11.h>

#include <chrono>
#include <memory>

#include "engine/interrupt.h"

namespace hotloop {

class SignalCheck {
 public:
  // Short enough to feel instant, long enough that taking the GIL costs nothing measurable.
  static constexpr std::chrono::milliseconds kInterval{5};

  // Call without the GIL between two units of work. Once per interval it takes the GIL to run Python's
  // signal handlers and throws what they raise (KeyboardInterrupt) as py::error_already_set.
  void poll() {
    const auto now = Clock::now();
    if (now < next_) return;
    {
      pybind11::gil_scoped_acquire gil;
      if (PyErr_CheckSignals() != 0) throw pybind11::error_already_set();
    }
    next_ = now + kInterval;
  }

 private:
  using Clock = std::chrono::steady_clock;
  Clock::time_point next_ = Clock::now() + kInterval;
};

// The PollFn the bindings hand to a native run: Python's signal handlers every few milliseconds.
inline PollFn python_signal_poll() {
  return [check = std::make_shared<SignalCheck>()] { check->poll(); };
}

}  // namespace hotloop
