/* How the compiled hot path (_hotpath.cpp) hands stored events to a compiled device
 * marker (_cuda_marks.cpp) without Python in between: a C table passed in a PyCapsule.
 * The marker is its own extension, built only against a CUDA torch, so the hot path
 * knows nothing of CUDA and stays built where the marker cannot be.
 *
 * A marker object (the Python type _cuda_marks.CudaMarks) has the attribute `capsule`:
 * a PyCapsule named DEVICE_MARKER_CAPSULE around a `struct device_marker` that lives as
 * long as the object. Store.device_marker = marks keeps the object alive and calls
 * `mark` for every stored event, on any thread, with or without the GIL. */
#ifndef MODTIMELINE_DEVICE_MARKS_H
#define MODTIMELINE_DEVICE_MARKS_H

#include <stdint.h>

#define DEVICE_MARKER_CAPSULE "modtimeline.native.device_marker"

struct device_marker {
  void* state;
  /* Host event `index` of `kind` was stored; `module` is the module index (forward
   * kinds) or the backward pass (node events). Must not raise: it reports its own errors. */
  void (*mark)(void* state, int64_t index, int64_t kind, int64_t module);
};

#endif /* MODTIMELINE_DEVICE_MARKS_H */
