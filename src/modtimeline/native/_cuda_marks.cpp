// Device marks made in C++ (optional; built only against a CUDA torch): what
// device/clock.py's DeviceClock.record_event does for each stored event, without Python
// and without the GIL on autograd's threads.
//
// A mark on an H200 cost 3.5 µs in a loop and ~8-12 µs inside a real step through Python
// (benchmarks/gpu_marks.py): the hot path's callback into Python (the GIL taken on
// autograd's device threads), a torch.cuda Stream object, the capture check, the record.
// Here it is the current stream (a thread-local read), a capture query, one
// cudaEventRecord and an append under a lock.
//
//   CudaMarks(need, module_device, marked_kinds, forward_kinds, reference_interval_ns)
//
// Everything that is not the mark itself stays in Python (DeviceClock): events are
// torch.cuda.Event objects it lends (give), reference events it records and names
// (set_reference), and marks it takes back at step boundaries (drain) to time them.
// When a device has no fresh reference or no event left, the mark calls need(device)
// with the GIL: DeviceClock records a reference and lends events (none past its bound,
// and the mark is then dropped and counted, as in Python). module_device(index) says a
// forward's GPU (None: the caller's), asked once per module and window.
//
// The hot path calls `mark` through the C table of _device_marks.h (Store.device_marker);
// Python may call mark() too (the pure-Python recorder).

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <c10/core/Device.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <time.h>

#include <mutex>
#include <new>
#include <string>
#include <utility>
#include <vector>

#include "_device_marks.h"
#include "_layout.h"

// Two functions of the CUDA runtime torch loaded (linked by file name: the same library).
// Declared here rather than through CUDA's headers, which a pip install of a CUDA torch
// does not bring with its runtime; every type in them is a C int or a pointer.
extern "C" {
int cudaStreamIsCapturing(void* stream, int* capture_status);
int cudaGetLastError(void);
}

namespace {

// The interface of CudaMarks (device/clock.py CUDA_MARKS_API).
constexpr long long CUDA_MARKS_API = 1;

constexpr int32_t DEVICE_UNKNOWN = -2;  // module_device not asked yet
constexpr int32_t DEVICE_NONE = -1;     // no GPU of its own: the caller's
constexpr int32_t MAX_DEVICES = 1024;
constexpr int CUDA_SUCCESS = 0, CAPTURE_STATUS_NONE = 0;

// torch's CUDA device guard (registered by its CUDA library, loaded before any of this
// runs): the current device and stream of this thread as torch keeps them, and event
// records as torch.cuda.Event.record makes them.
const c10::impl::DeviceGuardImplInterface& cuda() { return *c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA); }

int32_t current_device() { return cuda().getDevice().index(); }

inline int64_t now_ns() {  // CLOCK_MONOTONIC: Python's time.perf_counter_ns on Linux
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000LL + ts.tv_nsec;
}

// Holds a mutex, and never waits for it holding the GIL: a mark holds it across a record,
// and torch's GPU trace hooks (torch.cuda._sanitizer) take the GIL inside a record.
class Locked {
 public:
  explicit Locked(std::mutex& mutex) : mutex_(mutex) {
    if (mutex_.try_lock()) return;
    if (PyGILState_Check()) {
      Py_BEGIN_ALLOW_THREADS mutex_.lock();
      Py_END_ALLOW_THREADS
    } else {
      mutex_.lock();
    }
  }
  ~Locked() { mutex_.unlock(); }
  Locked(const Locked&) = delete;
  Locked& operator=(const Locked&) = delete;

 private:
  std::mutex& mutex_;
};

struct Lent {
  void* handle;  // the cudaEvent_t
  PyObject* event;  // the torch.cuda.Event it belongs to (owned)
};

struct Mark {
  int64_t host_event;
  PyObject* event;  // owned, handed to Python by drain()
  int64_t device;
  int64_t stream;  // torch's stream id
  int64_t reference;
};

struct DeviceState {
  std::vector<Lent> pool;
  int64_t reference = -1;  // the reference marks are timed against (-1: none yet)
  int64_t reference_ns = 0;
  int64_t undrained = 0;
  // need() could not help (DeviceClock at its bound): marks are dropped at once, without
  // asking again, until events, a reference or a drain come (give, set_reference, drain).
  bool exhausted = false;
};

struct Marks {
  std::mutex lock;  // never held across a Python call; taken through Locked
  std::vector<DeviceState> devices;
  std::vector<Mark> marks;
  std::vector<int32_t> module_devices;  // by module index
  int32_t forward_device = DEVICE_NONE;  // of the last forward whose device is known
  int64_t skipped_in_capture = 0, dropped = 0;
  std::string error;  // the first error met since the last drain
  uint32_t marked_kinds = 0, forward_kinds = 0;
  int64_t reference_interval_ns = 0;
  PyObject* need = nullptr;           // owned
  PyObject* module_device = nullptr;  // owned

  DeviceState& state(int32_t device) {  // (the caller holds `lock`)
    if (static_cast<size_t>(device) >= devices.size()) devices.resize(static_cast<size_t>(device) + 1);
    return devices[static_cast<size_t>(device)];
  }

  // callable(value) with the GIL taken whatever the thread (never with `lock` held);
  // `use` reads its result, the GIL still held. An error is reported as unraisable.
  template <typename Use>
  static void call_python(PyObject* callable, int64_t value, Use use) {
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject* result = PyObject_CallFunction(callable, "L", static_cast<long long>(value));
    if (result == nullptr) {
      PyErr_WriteUnraisable(callable);
    } else {
      use(result);
      Py_DECREF(result);
    }
    PyGILState_Release(gil);
  }

  // The GPU a forward event's work goes to: its module's, else the caller's.
  int32_t device_of_forward(int64_t module) {
    int32_t device = DEVICE_UNKNOWN;
    {
      Locked guard(lock);
      if (module >= 0 && static_cast<size_t>(module) < module_devices.size()) device = module_devices[module];
    }
    if (device == DEVICE_UNKNOWN && module >= 0) {
      device = DEVICE_NONE;
      call_python(module_device, module, [this, &device](PyObject* result) {
        if (result == Py_None) return;
        long value = PyLong_AsLong(result);
        if (value == -1 && PyErr_Occurred()) {
          PyErr_WriteUnraisable(module_device);
        } else if (value >= 0 && value < MAX_DEVICES) {
          device = static_cast<int32_t>(value);
        }
      });
      Locked guard(lock);
      if (static_cast<size_t>(module) >= module_devices.size()) {
        module_devices.resize(static_cast<size_t>(module) + 1, DEVICE_UNKNOWN);
      }
      module_devices[module] = device;
    }
    Locked guard(lock);
    if (device >= 0) return forward_device = device;
    if (forward_device < 0) forward_device = current_device();
    return forward_device;
  }

  void mark(int64_t index, int64_t kind, int64_t module) {
    if (index < 0 || kind < 0 || kind >= 32 || !((marked_kinds >> kind) & 1u)) return;
    int32_t device = ((forward_kinds >> kind) & 1u) ? device_of_forward(module) : current_device();
    if (device < 0 || device >= MAX_DEVICES) return;
    const c10::Device on(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device));
    const c10::Stream stream = cuda().getStream(on);
    int capture = CAPTURE_STATUS_NONE;
    int code = cudaStreamIsCapturing(cuda().getStreamNativeHandle(stream), &capture);
    if (code != CUDA_SUCCESS || capture != CAPTURE_STATUS_NONE) {
      // (an event recorded into a graph cannot be timed: skipped, as in Python)
      if (code != CUDA_SUCCESS) (void)cudaGetLastError();
      Locked guard(lock);
      ++skipped_in_capture;
      return;
    }
    int64_t now = now_ns();
    for (int attempt = 0;; ++attempt) {
      {
        Locked guard(lock);
        DeviceState& state = this->state(device);
        if (state.reference >= 0 && now - state.reference_ns <= reference_interval_ns && !state.pool.empty()) {
          Lent lent = state.pool.back();
          // (on the stream's device and back, as torch.cuda.Event.record; raises c10::Error
          // on a CUDA error, caught by mark_from_hot_path: the event stays in the pool)
          cuda().record(&lent.handle, stream, on.index(), c10::EventFlag::BACKEND_DEFAULT);
          state.pool.pop_back();
          ++state.undrained;
          marks.push_back(Mark{index, lent.event, device, static_cast<int64_t>(stream.id()), state.reference});
          return;
        }
        if (attempt > 0 || state.exhausted) {  // DeviceClock is at its bound
          ++dropped;
          return;
        }
      }
      // DeviceClock records a reference, lends events; False: it could lend none
      // (need raising counts as no help: reported once, then the device is exhausted
      // rather than asking again at every mark)
      bool helped = false;
      call_python(need, device, [this, &helped](PyObject* result) {
        int truth = PyObject_IsTrue(result);
        if (truth < 0) PyErr_WriteUnraisable(need);
        helped = truth == 1;
      });
      if (!helped) {
        Locked guard(lock);
        state(device).exhausted = true;
      }
    }
  }

  // Give back every event still held (the GIL held).
  void release() {
    std::vector<PyObject*> held;
    {
      Locked guard(lock);
      for (auto& state : devices) {
        for (const Lent& lent : state.pool) held.push_back(lent.event);
        state.pool.clear();
        state.undrained = 0;
      }
      for (const Mark& mark : marks) held.push_back(mark.event);
      marks.clear();
    }
    for (PyObject* event : held) Py_DECREF(event);
  }
};

void mark_from_hot_path(void* state, int64_t index, int64_t kind, int64_t module) {
  try {
    static_cast<Marks*>(state)->mark(index, kind, module);
  } catch (const std::exception& error) {  // (c10::Error from torch's CUDA calls: never into the caller)
    Locked guard(static_cast<Marks*>(state)->lock);
    if (static_cast<Marks*>(state)->error.empty()) static_cast<Marks*>(state)->error = error.what();
    ++static_cast<Marks*>(state)->dropped;
  }
}

// ------------------------------------------------------------------- CudaMarks

struct MarksObject {
  PyObject_HEAD
  Marks* marks;
  device_marker table;
};

PyObject* marks_new(PyTypeObject* type, PyObject* args, PyObject* kwargs) {
  static const char* keywords[] = {"need", "module_device", "marked_kinds", "forward_kinds", "reference_interval_ns",
                                   nullptr};
  PyObject *need, *module_device;
  unsigned long marked, forward;
  long long interval;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOkkL", const_cast<char**>(keywords), &need, &module_device, &marked,
                                   &forward, &interval)) {
    return nullptr;
  }
  if (!PyCallable_Check(need) || !PyCallable_Check(module_device)) {
    PyErr_SetString(PyExc_TypeError, "need and module_device must be callable");
    return nullptr;
  }
  auto* self = reinterpret_cast<MarksObject*>(type->tp_alloc(type, 0));
  if (self == nullptr) return nullptr;
  self->marks = new (std::nothrow) Marks();
  if (self->marks == nullptr) {
    Py_DECREF(self);
    return PyErr_NoMemory();
  }
  self->marks->need = Py_NewRef(need);
  self->marks->module_device = Py_NewRef(module_device);
  self->marks->marked_kinds = static_cast<uint32_t>(marked);
  self->marks->forward_kinds = static_cast<uint32_t>(forward);
  self->marks->reference_interval_ns = interval;
  self->table = device_marker{self->marks, mark_from_hot_path};
  return reinterpret_cast<PyObject*>(self);
}

void marks_dealloc(MarksObject* self) {
  if (self->marks != nullptr) {
    self->marks->release();
    Py_XDECREF(self->marks->need);
    Py_XDECREF(self->marks->module_device);
    delete self->marks;
  }
  Py_TYPE(self)->tp_free(reinterpret_cast<PyObject*>(self));
}

inline Marks& marks_of(PyObject* self) { return *reinterpret_cast<MarksObject*>(self)->marks; }

bool parse_device(PyObject* value, int32_t* device) {
  long parsed = PyLong_AsLong(value);
  if (parsed == -1 && PyErr_Occurred()) return false;
  if (parsed < 0 || parsed >= MAX_DEVICES) {
    PyErr_Format(PyExc_ValueError, "no such device: %ld", parsed);
    return false;
  }
  *device = static_cast<int32_t>(parsed);
  return true;
}

// give(device, events): lend torch.cuda.Event objects (created, bound to `device`).
PyObject* marks_give(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  int32_t device;
  if (nargs != 2 || !PyList_Check(args[1])) {
    PyErr_SetString(PyExc_TypeError, "give(device, events: list)");
    return nullptr;
  }
  if (!parse_device(args[0], &device)) return nullptr;
  static PyObject* handle_name = PyUnicode_InternFromString("cuda_event");
  std::vector<Lent> lent;  // (each event owned as soon as it is read: reading its handle runs Python)
  auto give_up = [&lent]() {
    for (const Lent& each : lent) Py_DECREF(each.event);
    return nullptr;
  };
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(args[1]); ++i) {
    PyObject* event = Py_NewRef(PyList_GET_ITEM(args[1], i));
    lent.push_back(Lent{nullptr, event});
    PyObject* handle = PyObject_GetAttr(event, handle_name);
    if (handle == nullptr) return give_up();
    lent.back().handle = PyLong_AsVoidPtr(handle);
    Py_DECREF(handle);
    if (lent.back().handle == nullptr) {
      if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "an event not created yet (record it once first)");
      return give_up();
    }
  }
  Marks& marks = marks_of(self);
  Locked guard(marks.lock);
  DeviceState& state = marks.state(device);
  state.pool.insert(state.pool.end(), lent.begin(), lent.end());
  state.exhausted = false;
  Py_RETURN_NONE;
}

// set_reference(device, reference, host_ns): marks on `device` are timed against it from now.
PyObject* marks_set_reference(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  int32_t device;
  if (nargs != 3) {
    PyErr_SetString(PyExc_TypeError, "set_reference(device, reference, host_ns)");
    return nullptr;
  }
  if (!parse_device(args[0], &device)) return nullptr;
  long long reference = PyLong_AsLongLong(args[1]), host_ns = PyLong_AsLongLong(args[2]);
  if (PyErr_Occurred()) return nullptr;
  Marks& marks = marks_of(self);
  Locked guard(marks.lock);
  DeviceState& state = marks.state(device);
  state.reference = reference;
  state.reference_ns = host_ns;
  state.exhausted = false;
  Py_RETURN_NONE;
}

// outstanding(device) -> (events in the pool, marks not drained yet) of `device`.
PyObject* marks_outstanding(PyObject* self, PyObject* arg) {
  int32_t device;
  if (!parse_device(arg, &device)) return nullptr;
  Marks& marks = marks_of(self);
  Locked guard(marks.lock);
  DeviceState& state = marks.state(device);
  return Py_BuildValue("(nL)", static_cast<Py_ssize_t>(state.pool.size()), static_cast<long long>(state.undrained));
}

PyObject* bytes_of(const std::vector<int64_t>& column) {
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(column.data()),
                                   static_cast<Py_ssize_t>(column.size() * sizeof(int64_t)));
}

// drain() -> (events, host_event, device, stream, reference, skipped_in_capture, dropped,
// error): the marks made since the last drain (columns as bytes of native int64; the
// events a list, given back), the counts and the first CUDA error ('' if none), reset.
PyObject* marks_drain(PyObject* self, PyObject*) {
  Marks& marks = marks_of(self);
  std::vector<Mark> taken;
  int64_t skipped, dropped;
  std::string error;
  {
    Locked guard(marks.lock);
    taken.swap(marks.marks);
    for (auto& state : marks.devices) {
      state.undrained = 0;
      state.exhausted = false;  // (the drained events go back to DeviceClock: it may lend again)
    }
    skipped = marks.skipped_in_capture;
    dropped = marks.dropped;
    error.swap(marks.error);
    marks.skipped_in_capture = marks.dropped = 0;
  }
  PyObject* events = PyList_New(static_cast<Py_ssize_t>(taken.size()));
  std::vector<int64_t> host_event, device, stream, reference;
  for (size_t i = 0; i < taken.size(); ++i) {
    const Mark& mark = taken[i];
    if (events != nullptr) {
      PyList_SET_ITEM(events, static_cast<Py_ssize_t>(i), mark.event);  // (the mark's reference, handed over)
    } else {
      Py_DECREF(mark.event);
    }
    host_event.push_back(mark.host_event);
    device.push_back(mark.device);
    stream.push_back(mark.stream);
    reference.push_back(mark.reference);
  }
  if (events == nullptr) return nullptr;
  return Py_BuildValue("(NNNNNLLs)", events, bytes_of(host_event), bytes_of(device), bytes_of(stream),
                       bytes_of(reference), static_cast<long long>(skipped), static_cast<long long>(dropped),
                       error.c_str());
}

// forget_modules(): ask module_device again (a window starts: a model may have moved).
PyObject* marks_forget_modules(PyObject* self, PyObject*) {
  Marks& marks = marks_of(self);
  Locked guard(marks.lock);
  marks.module_devices.clear();
  marks.forward_device = DEVICE_NONE;
  Py_RETURN_NONE;
}

// mark(index, kind, module): what the hot path calls, from Python.
PyObject* marks_mark(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs < 3) {
    PyErr_SetString(PyExc_TypeError, "mark(index, kind, module)");
    return nullptr;
  }
  long long index = PyLong_AsLongLong(args[0]), kind = PyLong_AsLongLong(args[1]),
            module = PyLong_AsLongLong(args[2]);
  if (PyErr_Occurred()) return nullptr;
  mark_from_hot_path(reinterpret_cast<MarksObject*>(self)->marks, index, kind, module);
  Py_RETURN_NONE;
}

// A new capsule around the object's table, holding the object while it lives.
void capsule_destructor(PyObject* capsule) { Py_XDECREF(static_cast<PyObject*>(PyCapsule_GetContext(capsule))); }

PyObject* marks_get_capsule(PyObject* self, void*) {
  PyObject* capsule =
      PyCapsule_New(&reinterpret_cast<MarksObject*>(self)->table, DEVICE_MARKER_CAPSULE, capsule_destructor);
  if (capsule != nullptr && PyCapsule_SetContext(capsule, Py_NewRef(self)) < 0) {
    Py_DECREF(self);
    Py_CLEAR(capsule);
  }
  return capsule;
}

PyMethodDef marks_methods[] = {
    {"give", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(marks_give)), METH_FASTCALL,
     "give(device, events): lend torch.cuda.Event objects for marks on `device`"},
    {"set_reference", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(marks_set_reference)), METH_FASTCALL,
     "set_reference(device, reference, host_ns): time the device's marks against this reference from now"},
    {"outstanding", marks_outstanding, METH_O, "outstanding(device) -> (events in the pool, marks not drained yet)"},
    {"drain", marks_drain, METH_NOARGS,
     "drain() -> (events, host_event, device, stream, reference, skipped_in_capture, dropped, error)"},
    {"forget_modules", marks_forget_modules, METH_NOARGS, "ask module_device again for every module"},
    {"mark", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(marks_mark)), METH_FASTCALL,
     "mark(index, kind, module): mark a stored event on the device"},
    {nullptr, nullptr, 0, nullptr},
};

PyGetSetDef marks_getset[] = {
    {"capsule", marks_get_capsule, nullptr, "the C table the compiled hot path calls (_device_marks.h)", nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr},
};

PyTypeObject MarksType = [] {
  PyTypeObject type{PyVarObject_HEAD_INIT(nullptr, 0)};
  type.tp_name = "modtimeline.native._cuda_marks.CudaMarks";
  type.tp_basicsize = sizeof(MarksObject);
  type.tp_flags = Py_TPFLAGS_DEFAULT;
  type.tp_doc = "CudaMarks(need, module_device, marked_kinds, forward_kinds, reference_interval_ns)";
  type.tp_new = marks_new;
  type.tp_dealloc = reinterpret_cast<destructor>(marks_dealloc);
  type.tp_methods = marks_methods;
  type.tp_getset = marks_getset;
  return type;
}();

PyModuleDef cuda_marks_module = {
    PyModuleDef_HEAD_INIT, "modtimeline.native._cuda_marks", "modtimeline's device marks in C++ (CUDA)", -1,
    nullptr,               nullptr,                          nullptr,                                    nullptr,
    nullptr,
};

}  // namespace

PyMODINIT_FUNC PyInit__cuda_marks() {
  if (PyType_Ready(&MarksType) < 0) return nullptr;
  PyObject* module = PyModule_Create(&cuda_marks_module);
  if (module == nullptr) return nullptr;
  if (PyModule_AddObjectRef(module, "CudaMarks", reinterpret_cast<PyObject*>(&MarksType)) < 0 ||
      modtimeline_layout::add_layout(module, CUDA_MARKS_API) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
