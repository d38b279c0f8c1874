/* Every constant the compiled parts share with Python: the one C copy of the event
 * layout (capture/buffer.py) and of the span flags, flows and track ids (format.py).
 * Plain C, so the C writers and the C++ parts include the same file.
 *
 * The handshake, the same for every compiled part: the part exports LAYOUT, made by
 * shared_layout() below with its own argument version (API), and native/loader.py
 * refuses a part whose LAYOUT differs from loader.shared_constants() plus the API the
 * Python side calls it with. tests/test_layout.py reads this file and fails when a
 * constant here drifts from Python's, built or not. */
#ifndef MODTIMELINE_LAYOUT_H
#define MODTIMELINE_LAYOUT_H

#include <Python.h>
#include <stdint.h>

#ifdef __cplusplus
namespace modtimeline_layout {
#endif

/* Raised when what an event means changes without its layout changing (2: node events
 * and BACKWARD_DONE carry their backward pass in the module field). */
enum { EVENT_SEMANTICS = 2 };

/* An event code: call << CALL_SHIFT | module << KIND_BITS | kind. */
enum {
  KIND_BITS = 4,
  MODULE_BITS = 20,
  KIND_MASK = (1 << KIND_BITS) - 1,
  CALL_SHIFT = KIND_BITS + MODULE_BITS,
  MODULE_MASK = (1 << MODULE_BITS) - 1,
  /* A node link: call << LINK_SHIFT | module << 1 | LINK_BEGIN. */
  LINK_BEGIN = 1,
  LINK_SHIFT = MODULE_BITS + 1,
  /* The nodes one call's walk visits at most; past it the call's end is left unbounded. */
  SUBGRAPH_BUDGET = 1 << 17,
};

/* Event kinds. */
enum {
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

/* Span categories, flags, flows and track ids (format.py); the lag of a span without one. */
enum { FORWARD = 0, BACKWARD = 1, RECOMPUTE = 2, STEP = 3 };
#define NO_LAG INT64_MIN
enum { INCOMPLETE = 1, APPROXIMATE = 2, COMPILED = 4, FUSED = 8 };
enum { FLOW_NONE = 0, FLOW_OUT = 1, FLOW_IN = 2 };
enum { STEPS_TRACK = 1, FORWARD_TRACK = 2, BACKWARD_TRACK = 10 };

/* A new dict of every constant above, and API: the part's LAYOUT; NULL on error. */
static inline PyObject* shared_layout(long long api) {
  static const struct { const char* name; long long value; } constants[] = {
      {"EVENT_SEMANTICS", EVENT_SEMANTICS}, {"KIND_BITS", KIND_BITS}, {"MODULE_BITS", MODULE_BITS},
      {"LINK_BEGIN", LINK_BEGIN}, {"LINK_SHIFT", LINK_SHIFT}, {"SUBGRAPH_BUDGET", SUBGRAPH_BUDGET},
      {"FORWARD_BEGIN", FORWARD_BEGIN}, {"FORWARD_END", FORWARD_END}, {"NODE_DONE", NODE_DONE},
      {"RECOMPUTE_BEGIN", RECOMPUTE_BEGIN}, {"RECOMPUTE_END", RECOMPUTE_END}, {"STEP_BEGIN", STEP_BEGIN},
      {"STEP_END", STEP_END}, {"GRADIENT_READY", GRADIENT_READY}, {"BACKWARD_DONE", BACKWARD_DONE},
      {"INCOMPLETE", INCOMPLETE}, {"APPROXIMATE", APPROXIMATE}, {"COMPILED", COMPILED}, {"FUSED", FUSED},
      {"FLOW_NONE", FLOW_NONE}, {"FLOW_OUT", FLOW_OUT}, {"FLOW_IN", FLOW_IN},
      {"STEPS_TRACK", STEPS_TRACK}, {"FORWARD_TRACK", FORWARD_TRACK}, {"BACKWARD_TRACK", BACKWARD_TRACK},
      {"FORWARD", FORWARD}, {"BACKWARD", BACKWARD}, {"RECOMPUTE", RECOMPUTE}, {"STEP", STEP},
      {"NO_LAG", NO_LAG},
  };
  PyObject* layout = Py_BuildValue("{s:L}", "API", api);
  for (size_t i = 0; layout != NULL && i < sizeof(constants) / sizeof(constants[0]); ++i) {
    PyObject* value = PyLong_FromLongLong(constants[i].value);
    if (value == NULL || PyDict_SetItemString(layout, constants[i].name, value) < 0) Py_CLEAR(layout);
    Py_XDECREF(value);
  }
  return layout;
}

/* Add LAYOUT (shared_layout(api)) to `module`; -1 on error. */
static inline int add_layout(PyObject* module, long long api) {
  PyObject* layout = shared_layout(api);
  int added = layout == NULL ? -1 : PyModule_AddObject(module, "LAYOUT", layout);
  if (added < 0) Py_XDECREF(layout);
  return added;
}

#ifdef __cplusplus
}  /* namespace modtimeline_layout */
#endif

#endif /* MODTIMELINE_LAYOUT_H */
