// The event layout shared by the compiled parts: the one C++ copy of buffer.py's
// constants. Each extension exports it as LAYOUT (event_layout() below) and Python
// refuses an extension whose LAYOUT differs from buffer.LAYOUT.
#pragma once

#include <Python.h>

#include <cstdint>

namespace modtimeline_layout {

constexpr int64_t KIND_BITS = 4;
constexpr int64_t MODULE_BITS = 20;
constexpr int64_t KIND_MASK = (1 << KIND_BITS) - 1;
constexpr int64_t CALL_SHIFT = KIND_BITS + MODULE_BITS;
constexpr int64_t MODULE_MASK = (1 << MODULE_BITS) - 1;
constexpr int64_t LINK_BEGIN = 1;
constexpr int64_t LINK_SHIFT = MODULE_BITS + 1;
// The nodes one call's walk visits at most; past it the call's end is left unbounded.
constexpr int64_t SUBGRAPH_BUDGET = 1 << 17;
// Raised when what an event means changes without its layout changing (2: node events
// and BACKWARD_DONE carry their backward pass in the module field).
constexpr int64_t EVENT_SEMANTICS = 2;

enum Kind : int64_t {
  FORWARD_BEGIN = 0,
  FORWARD_END = 1,
  NODE_DONE = 2,
  RECOMPUTE_BEGIN = 4,
  RECOMPUTE_END = 5,
  STEP_BEGIN = 6,
  STEP_END = 7,
  GRADIENT_READY = 8,
  BACKWARD_DONE = 9,
};

// A new dict of the constants above, as buffer.LAYOUT holds them; nullptr on error.
inline PyObject* event_layout() {
  using L = long long;
  return Py_BuildValue("{s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L}", "EVENT_SEMANTICS",
                       L(EVENT_SEMANTICS), "KIND_BITS", L(KIND_BITS),
                       "MODULE_BITS", L(MODULE_BITS), "LINK_BEGIN", L(LINK_BEGIN), "LINK_SHIFT", L(LINK_SHIFT),
                       "SUBGRAPH_BUDGET", L(SUBGRAPH_BUDGET), "FORWARD_BEGIN", L(FORWARD_BEGIN), "FORWARD_END",
                       L(FORWARD_END), "NODE_DONE", L(NODE_DONE), "RECOMPUTE_BEGIN", L(RECOMPUTE_BEGIN),
                       "RECOMPUTE_END", L(RECOMPUTE_END), "STEP_BEGIN", L(STEP_BEGIN), "GRADIENT_READY",
                       L(GRADIENT_READY), "BACKWARD_DONE", L(BACKWARD_DONE));
}

// Add LAYOUT (the dict `layout`, whose reference this takes) to `module`; -1 on error.
inline int add_layout(PyObject* module, PyObject* layout) {
  int added = layout == nullptr ? -1 : PyModule_AddObjectRef(module, "LAYOUT", layout);
  Py_XDECREF(layout);
  return added;
}

}  // namespace modtimeline_layout
