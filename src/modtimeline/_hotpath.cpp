// The recording hot path of modtimeline's Recorder, compiled (optional; recorder.py
// holds the same logic in Python and uses it when this module is not built).
//
// Two Python types:
//
//   Store(capacity)      the event buffer: host timestamps and packed codes, node links,
//                        as buffer.EventBuffer (same layout and capacity rules).
//   ForwardHooks(store, recorder)
//                        the global forward pre/post hooks of one Recorder: module
//                        index lookup, call numbering and the forward stack, exactly as
//                        Recorder._pre_forward/_post_forward; the rare cases (containers
//                        of tensors, leaf tensors, several inputs, a raised forward) call
//                        back into the Python recorder.
//
// Why it is faster than Python: besides running no bytecode, the backward "gradient
// ready" marks are C++ FunctionPreHooks added straight to the autograd node. Torch's
// Python register_prehook builds an OrderedDict and a RemovableHandle per node and
// fires through the GIL with a tuple of gradients; a C++ pre-hook costs one allocation
// to add and runs without the GIL.
//
// Timestamps come from CLOCK_MONOTONIC, the clock behind Python's time.perf_counter_ns
// on Linux, so events stamped here and in Python share one timeline (tested).

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/python_variable.h>

#include <time.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <type_traits>
#include <utility>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace {

// Must match buffer.py.
constexpr int64_t KIND_BITS = 4;
constexpr int64_t CALL_SHIFT = KIND_BITS + 20;
constexpr int64_t LINK_BEGIN = 1;
constexpr int64_t LINK_SHIFT = 21;
enum Kind : int64_t {
  FORWARD_BEGIN = 0,
  FORWARD_END = 1,
  BACKWARD_BEGIN = 2,
  BACKWARD_END = 3,
  RECOMPUTE_BEGIN = 4,
  RECOMPUTE_END = 5,
  STEP_BEGIN = 6,
  STEP_END = 7,
  GRADIENT_READY = 8,
  BACKWARD_DONE = 9,
};

inline bool is_begin(int64_t kind) {
  return kind == FORWARD_BEGIN || kind == BACKWARD_BEGIN || kind == RECOMPUTE_BEGIN || kind == STEP_BEGIN ||
         kind == GRADIENT_READY;
}

// An autograd node pointer: std::shared_ptr<Node> in older torch, c10::intrusive_ptr<Node>
// in newer; NodeRef is the weak reference of whichever it is.
using NodePtr = std::decay_t<decltype(std::declval<const at::Tensor&>().grad_fn())>;

template <class Pointer>
struct WeakOf;
template <class T>
struct WeakOf<std::shared_ptr<T>> {
  using type = std::weak_ptr<T>;
  static type make(const std::shared_ptr<T>& pointer) { return pointer; }
};
template <class T, class NullType>
struct WeakOf<c10::intrusive_ptr<T, NullType>> {
  using type = c10::weak_intrusive_ptr<T, NullType>;
  static type make(const c10::intrusive_ptr<T, NullType>& pointer) { return type(pointer); }
};
using NodeRef = typename WeakOf<NodePtr>::type;

inline int64_t now_ns() {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000LL + ts.tv_nsec;
}

// The events, shared by the Store object and every node mark (a graph can outlive
// the Store; its marks then hold the events alive and record into nothing visible).
struct Events : std::enable_shared_from_this<Events> {
  std::mutex mutex;  // node marks fire on autograd's threads, without the GIL
  std::vector<int64_t> timestamps, codes, link_node, link_code;
  int64_t capacity = 0, hard_limit = 0, dropped = 0, nodes = 0;
  uint64_t generation = 0;  // bumped by clear()/remove_marks(): older marks are stale
  bool done_queued = false;
  std::atomic<PyObject*> on_recorded{nullptr};  // owned reference; changed with the GIL held
  std::vector<NodeRef> marked;  // nodes holding our marks
  size_t prune_at = 4096;

  // Append one event; the caller holds `mutex`. Returns its index, or -1 if dropped.
  int64_t append_locked(int64_t kind, int64_t call, int64_t module) {
    auto n = static_cast<int64_t>(codes.size());
    if (n >= capacity && (n >= hard_limit || is_begin(kind))) {
      ++dropped;
      return -1;
    }
    timestamps.push_back(now_ns());
    codes.push_back(call << CALL_SHIFT | module << KIND_BITS | kind);
    return n;
  }

  int64_t append(int64_t kind, int64_t call, int64_t module) {
    std::lock_guard<std::mutex> guard(mutex);
    return append_locked(kind, call, module);
  }

  // Tell on_recorded (the device clock) about event `index`. The caller holds the GIL.
  bool notify_with_gil(int64_t index) {
    PyObject* callback = on_recorded.load();
    if (index < 0 || callback == nullptr) return true;
    PyObject* arg = PyLong_FromLongLong(index);
    if (arg == nullptr) return false;
    PyObject* result = PyObject_CallOneArg(callback, arg);
    Py_DECREF(arg);
    Py_XDECREF(result);
    return result != nullptr;
  }

  // Store one event and tell on_recorded; the caller holds the GIL. False: it raised.
  bool record(int64_t kind, int64_t call, int64_t module) { return notify_with_gil(append(kind, call, module)); }

  // Tell on_recorded from any thread, holding the GIL or not (autograd's threads do not);
  // an error in it cannot propagate into autograd, so it is reported as unraisable.
  void notify(int64_t index) {
    if (index < 0 || on_recorded.load() == nullptr) return;
    PyGILState_STATE state = PyGILState_Ensure();
    if (!notify_with_gil(index)) PyErr_WriteUnraisable(nullptr);
    PyGILState_Release(state);
  }

  // Called on autograd's thread inside a backward: a gradient is ready, or a leaf's
  // hook fired. Queues one BACKWARD_DONE per backward pass (an engine callback).
  void backward_event(int64_t kind, int64_t call, int64_t module, uint64_t mark_generation) {
    int64_t index;
    bool queue = false;
    {
      std::lock_guard<std::mutex> guard(mutex);
      if (mark_generation != generation) return;
      index = append_locked(kind, call, module);
      if (!done_queued) done_queued = queue = true;
    }
    if (queue) {
      std::weak_ptr<Events> self = weak_from_this();
      torch::autograd::Engine::get_default_engine().queue_callback([self, mark_generation] {
        if (auto events = self.lock()) events->backward_done(mark_generation);
      });
    }
    notify(index);
  }

  void backward_done(uint64_t mark_generation) {
    int64_t index = -1;
    {
      std::lock_guard<std::mutex> guard(mutex);
      done_queued = false;
      if (mark_generation == generation) index = append_locked(BACKWARD_DONE, 0, 0);
    }
    notify(index);
  }

  void clear() {
    std::lock_guard<std::mutex> guard(mutex);
    timestamps = {};
    codes = {};
    link_node = {};
    link_code = {};
    nodes = 0;
    dropped = 0;
    done_queued = false;
    ++generation;
  }

  void link(const NodePtr& node, int64_t link);
  void remove_marks();
};

// The pre-hook of one autograd node: records that its gradient is ready.
struct NodeMark : torch::autograd::FunctionPreHook {
  NodeMark(std::shared_ptr<Events> events, int64_t node_id, uint64_t generation)
      : events(std::move(events)), node_id(node_id), generation(generation) {}

  torch::autograd::variable_list operator()(const torch::autograd::variable_list& grads) override {
    events->backward_event(GRADIENT_READY, node_id, 0, generation);
    return grads;
  }

  std::shared_ptr<Events> events;
  int64_t node_id;
  uint64_t generation;
};

// Link `node` to a call boundary, adding this store's mark to it on first use.
void Events::link(const NodePtr& node, int64_t link) {
  std::lock_guard<std::mutex> guard(mutex);
  // A full buffer: this call's backward goes unrecorded, as its events do.
  if (static_cast<int64_t>(codes.size()) >= capacity) return;
  int64_t node_id = -1;
  for (const auto& hook : node->pre_hooks()) {
    auto* mark = dynamic_cast<NodeMark*>(hook.get());
    if (mark != nullptr && mark->events.get() == this && mark->generation == generation) {
      node_id = mark->node_id;
      break;
    }
  }
  if (node_id < 0) {
    node_id = nodes++;
    node->add_pre_hook(std::make_unique<NodeMark>(shared_from_this(), node_id, generation));
    if (marked.size() >= prune_at) {
      marked.erase(std::remove_if(marked.begin(), marked.end(), [](const auto& w) { return w.expired(); }),
                   marked.end());
      prune_at = std::max<size_t>(4096, 2 * marked.size());
    }
    marked.push_back(WeakOf<NodePtr>::make(node));
  }
  link_node.push_back(node_id);
  link_code.push_back(link);
}

void Events::remove_marks() {
  std::lock_guard<std::mutex> guard(mutex);
  for (auto& weak : marked) {
    if (auto node = weak.lock()) {
      auto& hooks = node->pre_hooks();
      hooks.erase(std::remove_if(hooks.begin(), hooks.end(),
                                 [this](const std::unique_ptr<torch::autograd::FunctionPreHook>& hook) {
                                   auto* mark = dynamic_cast<NodeMark*>(hook.get());
                                   return mark != nullptr && mark->events.get() == this;
                                 }),
                  hooks.end());
    }
  }
  marked.clear();
  prune_at = 4096;
  done_queued = false;
  ++generation;
}

// ------------------------------------------------------------------------ Store

struct StoreObject {
  PyObject_HEAD
  std::shared_ptr<Events>* events;
};

PyObject* store_new(PyTypeObject* type, PyObject* args, PyObject* kwargs) {
  static const char* keywords[] = {"capacity", nullptr};
  long long capacity;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "L", const_cast<char**>(keywords), &capacity)) return nullptr;
  if (capacity < 1) {
    PyErr_Format(PyExc_ValueError, "buffer capacity must be at least 1 event, got %lld", capacity);
    return nullptr;
  }
  auto* self = reinterpret_cast<StoreObject*>(type->tp_alloc(type, 0));
  if (self == nullptr) return nullptr;
  self->events = new std::shared_ptr<Events>(std::make_shared<Events>());
  Events& events = **self->events;
  events.capacity = capacity;
  events.hard_limit = capacity + std::max<long long>(4096, capacity / 16);
  return reinterpret_cast<PyObject*>(self);
}

void store_dealloc(StoreObject* self) {
  if (self->events != nullptr) {
    Py_XDECREF((*self->events)->on_recorded.exchange(nullptr));
    delete self->events;
  }
  Py_TYPE(self)->tp_free(reinterpret_cast<PyObject*>(self));
}

inline Events& events_of(PyObject* store) { return **reinterpret_cast<StoreObject*>(store)->events; }

bool parse_event(PyObject* const* args, Py_ssize_t nargs, int64_t* kind, int64_t* call, int64_t* module) {
  if (nargs < 3) {
    PyErr_SetString(PyExc_TypeError, "expected (kind, call, module)");
    return false;
  }
  *kind = PyLong_AsLongLong(args[0]);
  *call = PyLong_AsLongLong(args[1]);
  *module = PyLong_AsLongLong(args[2]);
  return !PyErr_Occurred();
}

// record(kind, call, module): store one event stamped now.
PyObject* store_record(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  int64_t kind, call, module;
  if (!parse_event(args, nargs, &kind, &call, &module)) return nullptr;
  if (!events_of(self).record(kind, call, module)) return nullptr;
  Py_RETURN_NONE;
}

// backward_event(kind, call, module, *grads): a Python hook's backward event (a leaf
// tensor's or a multi-grad hook's); also queues the backward-done event.
PyObject* store_backward_event(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  int64_t kind, call, module;
  if (!parse_event(args, nargs, &kind, &call, &module)) return nullptr;
  Events& events = events_of(self);
  uint64_t generation;
  {
    std::lock_guard<std::mutex> guard(events.mutex);
    generation = events.generation;
  }
  events.backward_event(kind, call, module, generation);
  Py_RETURN_NONE;
}

// link(tensor, link) -> bool: link `tensor`'s autograd node to a call boundary, adding
// this store's mark to the node on first use. False when the tensor is a leaf (no node).
PyObject* store_link(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2 || !THPVariable_Check(args[0])) {
    PyErr_SetString(PyExc_TypeError, "link(tensor, link) expects a tensor and an int");
    return nullptr;
  }
  int64_t link = PyLong_AsLongLong(args[1]);
  if (link == -1 && PyErr_Occurred()) return nullptr;
  NodePtr node = THPVariable_Unpack(args[0]).grad_fn();
  if (!node) Py_RETURN_FALSE;
  events_of(self).link(node, link);
  Py_RETURN_TRUE;
}

PyObject* bytes_of(const std::vector<int64_t>& column) {
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(column.data()),
                                   static_cast<Py_ssize_t>(column.size() * sizeof(int64_t)));
}

// columns() -> (timestamps, codes, link_node, link_code) as bytes of native int64.
PyObject* store_columns(PyObject* self, PyObject*) {
  Events& events = events_of(self);
  std::lock_guard<std::mutex> guard(events.mutex);
  return Py_BuildValue("(NNNN)", bytes_of(events.timestamps), bytes_of(events.codes), bytes_of(events.link_node),
                       bytes_of(events.link_code));
}

PyObject* store_clear(PyObject* self, PyObject*) {
  events_of(self).clear();
  Py_RETURN_NONE;
}

PyObject* store_remove_marks(PyObject* self, PyObject*) {
  events_of(self).remove_marks();
  Py_RETURN_NONE;
}

PyObject* store_bytes_used(PyObject* self, PyObject*) {
  Events& events = events_of(self);
  std::lock_guard<std::mutex> guard(events.mutex);
  size_t slots = events.timestamps.capacity() + events.codes.capacity() + events.link_node.capacity() +
                 events.link_code.capacity();
  return PyLong_FromSize_t(slots * sizeof(int64_t));
}

PyObject* store_now(PyObject*, PyObject*) { return PyLong_FromLongLong(now_ns()); }

Py_ssize_t store_len(PyObject* self) {
  Events& events = events_of(self);
  std::lock_guard<std::mutex> guard(events.mutex);
  return static_cast<Py_ssize_t>(events.codes.size());
}

PyObject* store_get_capacity(PyObject* self, void*) { return PyLong_FromLongLong(events_of(self).capacity); }
PyObject* store_get_dropped(PyObject* self, void*) {
  Events& events = events_of(self);
  std::lock_guard<std::mutex> guard(events.mutex);
  return PyLong_FromLongLong(events.dropped);
}
PyObject* store_get_nodes(PyObject* self, void*) {
  Events& events = events_of(self);
  std::lock_guard<std::mutex> guard(events.mutex);
  return PyLong_FromLongLong(events.nodes);
}

PyObject* store_get_on_recorded(PyObject* self, void*) {
  PyObject* callback = events_of(self).on_recorded.load();
  if (callback == nullptr) Py_RETURN_NONE;
  Py_INCREF(callback);
  return callback;
}

int store_set_on_recorded(PyObject* self, PyObject* value, void*) {
  PyObject* callback = (value == nullptr || value == Py_None) ? nullptr : value;
  if (callback != nullptr && !PyCallable_Check(callback)) {
    PyErr_SetString(PyExc_TypeError, "on_recorded must be callable or None");
    return -1;
  }
  Py_XINCREF(callback);
  Py_XDECREF(events_of(self).on_recorded.exchange(callback));
  return 0;
}

PyMethodDef store_methods[] = {
    {"record", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(store_record)), METH_FASTCALL,
     "record(kind, call, module): store one event stamped now"},
    {"backward_event", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(store_backward_event)),
     METH_FASTCALL, "backward_event(kind, call, module, *grads): an event from a Python autograd hook"},
    {"link", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(store_link)), METH_FASTCALL,
     "link(tensor, link) -> bool: link the tensor's autograd node to a call boundary"},
    {"columns", store_columns, METH_NOARGS, "(timestamps, codes, link_node, link_code) as int64 bytes"},
    {"clear", store_clear, METH_NOARGS, "drop every event and link; node marks already placed go stale"},
    {"remove_marks", store_remove_marks, METH_NOARGS, "take this store's marks off every autograd node"},
    {"bytes_used", store_bytes_used, METH_NOARGS, "bytes allocated for events and links"},
    {"now", store_now, METH_NOARGS | METH_STATIC, "the clock events are stamped with, in ns"},
    {nullptr, nullptr, 0, nullptr},
};

PyGetSetDef store_getset[] = {
    {"capacity", store_get_capacity, nullptr, "events held at most", nullptr},
    {"dropped", store_get_dropped, nullptr, "events dropped since the last clear", nullptr},
    {"nodes", store_get_nodes, nullptr, "autograd nodes given an id since the last clear", nullptr},
    {"on_recorded", store_get_on_recorded, store_set_on_recorded, "called with each stored event's index",
     nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr},
};

PySequenceMethods store_sequence = {store_len};

PyTypeObject StoreType = [] {
  PyTypeObject type{PyVarObject_HEAD_INIT(nullptr, 0)};
  type.tp_name = "modtimeline._hotpath.Store";
  type.tp_basicsize = sizeof(StoreObject);
  type.tp_flags = Py_TPFLAGS_DEFAULT;
  type.tp_doc = "Store(capacity): the compiled event buffer";
  type.tp_new = store_new;
  type.tp_dealloc = reinterpret_cast<destructor>(store_dealloc);
  type.tp_methods = store_methods;
  type.tp_getset = store_getset;
  type.tp_as_sequence = &store_sequence;
  return type;
}();

// --------------------------------------------------------------- ForwardHooks

struct Frame {
  int64_t call;
  int64_t index;
  bool recompute;
};

struct KnownModule {
  int64_t index;
  PyObject* ref;  // weak reference to the module (owned)
};

struct HooksObject {
  PyObject_HEAD
  PyObject* store;     // StoreObject
  PyObject* recorder;  // the Python Recorder: rare paths and module naming
  int64_t next_call;
  std::vector<Frame>* stack;
  std::unordered_map<PyObject*, KnownModule>* modules;  // by the module's address
};

PyObject* hooks_new(PyTypeObject* type, PyObject* args, PyObject* kwargs) {
  static const char* keywords[] = {"store", "recorder", nullptr};
  PyObject *store, *recorder;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!O", const_cast<char**>(keywords), &StoreType, &store,
                                   &recorder))
    return nullptr;
  auto* self = reinterpret_cast<HooksObject*>(type->tp_alloc(type, 0));
  if (self == nullptr) return nullptr;
  Py_INCREF(store);
  Py_INCREF(recorder);
  self->store = store;
  self->recorder = recorder;
  self->next_call = 0;
  self->stack = new std::vector<Frame>();
  self->modules = new std::unordered_map<PyObject*, KnownModule>();
  return reinterpret_cast<PyObject*>(self);
}

void forget_modules(HooksObject* self) {
  if (self->modules == nullptr) return;
  for (auto& entry : *self->modules) Py_DECREF(entry.second.ref);
  self->modules->clear();
}

int hooks_traverse(HooksObject* self, visitproc visit, void* arg) {
  Py_VISIT(self->store);
  Py_VISIT(self->recorder);
  return 0;
}

int hooks_clear(HooksObject* self) {
  Py_CLEAR(self->store);
  Py_CLEAR(self->recorder);
  return 0;
}

void hooks_dealloc(HooksObject* self) {
  PyObject_GC_UnTrack(self);
  hooks_clear(self);
  forget_modules(self);
  delete self->modules;
  delete self->stack;
  Py_TYPE(self)->tp_free(reinterpret_cast<PyObject*>(self));
}

// The module's index in the recorder, learning it (in Python) on first sight.
int64_t index_of(HooksObject* self, PyObject* module) {
  auto found = self->modules->find(module);
  if (found != self->modules->end() && PyWeakref_GetObject(found->second.ref) == module) {
    return found->second.index;
  }
  PyObject* learned = PyObject_CallMethod(self->recorder, "_learn", "O", module);
  if (learned == nullptr) return -1;
  int64_t index = PyLong_AsLongLong(learned);
  Py_DECREF(learned);
  if (index == -1 && PyErr_Occurred()) return -1;
  PyObject* ref = PyWeakref_NewRef(module, nullptr);
  if (ref == nullptr) return -1;
  if (found != self->modules->end()) {
    Py_DECREF(found->second.ref);  // a dead module's address, reused
    found->second = {index, ref};
  } else {
    self->modules->emplace(module, KnownModule{index, ref});
  }
  return index;
}

// Whether `module` is the module recorded under `index` (a cheap identity check).
bool is_module(HooksObject* self, PyObject* module, int64_t index) {
  auto found = self->modules->find(module);
  return found != self->modules->end() && found->second.index == index &&
         PyWeakref_GetObject(found->second.ref) == module;
}

// A tensor argument's boundary: link its node, or hand a leaf to Python.
bool link_tensor(HooksObject* self, PyObject* tensor, int64_t kind, int64_t call, int64_t index) {
  const at::Tensor& value = THPVariable_Unpack(tensor);
  if (!value.requires_grad()) return true;
  if (const NodePtr& node = value.grad_fn()) {
    events_of(self->store).link(node, call << LINK_SHIFT | index << 1 | (kind == BACKWARD_BEGIN ? LINK_BEGIN : 0));
    return true;
  }
  PyObject* result = PyObject_CallMethod(self->recorder, "_hook_leaf", "LLLO", static_cast<long long>(kind),
                                         static_cast<long long>(call), static_cast<long long>(index), tensor);
  Py_XDECREF(result);
  return result != nullptr;
}

// pre_forward(module, args): a module's forward begins.
PyObject* hooks_pre_forward(PyObject* obj, PyObject* const* args, Py_ssize_t nargs) {
  auto* self = reinterpret_cast<HooksObject*>(obj);
  if (nargs != 2) {
    PyErr_SetString(PyExc_TypeError, "pre_forward(module, args)");
    return nullptr;
  }
  int64_t index = index_of(self, args[0]);
  if (index < 0) return nullptr;
  int64_t call = self->next_call++;
  Events& events = events_of(self->store);
  if (torch::autograd::get_current_graph_task_id() != -1) {
    // Forward inside backward: activation-checkpoint recompute.
    if (!events.record(RECOMPUTE_BEGIN, call, index)) return nullptr;
    self->stack->push_back({call, index, true});
    Py_RETURN_NONE;
  }
  if (!events.record(FORWARD_BEGIN, call, index)) return nullptr;
  self->stack->push_back({call, index, false});
  if (!c10::GradMode::is_enabled()) Py_RETURN_NONE;
  PyObject* inputs = args[1];
  if (PyTuple_CheckExact(inputs) && PyTuple_GET_SIZE(inputs) == 1 && THPVariable_Check(PyTuple_GET_ITEM(inputs, 0))) {
    if (!link_tensor(self, PyTuple_GET_ITEM(inputs, 0), BACKWARD_END, call, index)) return nullptr;
    Py_RETURN_NONE;
  }
  return PyObject_CallMethod(self->recorder, "_hook_inputs", "LLO", static_cast<long long>(call),
                             static_cast<long long>(index), inputs);
}

// post_forward(module, args, output): a module's forward ended (output None if it raised).
PyObject* hooks_post_forward(PyObject* obj, PyObject* const* args, Py_ssize_t nargs) {
  auto* self = reinterpret_cast<HooksObject*>(obj);
  if (nargs != 3) {
    PyErr_SetString(PyExc_TypeError, "post_forward(module, args, output)");
    return nullptr;
  }
  auto& stack = *self->stack;
  if (stack.empty()) Py_RETURN_NONE;  // the forward began before the hooks were on
  Frame frame = stack.back();
  // A pre-hook of ours never ran for this module (another pre-hook raised): leave the
  // open entry rather than closing somebody else's span.
  if (!is_module(self, args[0], frame.index)) Py_RETURN_NONE;
  stack.pop_back();
  Events& events = events_of(self->store);
  if (frame.recompute) {
    // (Non-reentrant checkpointing stops recompute early by raising: not a failure.)
    if (!events.record(RECOMPUTE_END, frame.call, frame.index)) return nullptr;
    Py_RETURN_NONE;
  }
  if (!events.record(FORWARD_END, frame.call, frame.index)) return nullptr;
  PyObject* output = args[2];
  if (output == Py_None) {
    PyObject *type, *value, *traceback;
    PyErr_GetExcInfo(&type, &value, &traceback);
    bool raised = value != nullptr && value != Py_None;
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(traceback);
    if (raised) {  // the forward raised: torch calls the hook with no output
      return PyObject_CallMethod(self->recorder, "_forward_raised", "L", static_cast<long long>(frame.call));
    }
    Py_RETURN_NONE;
  }
  if (!c10::GradMode::is_enabled()) Py_RETURN_NONE;
  if (THPVariable_Check(output)) {
    if (!link_tensor(self, output, BACKWARD_BEGIN, frame.call, frame.index)) return nullptr;
    Py_RETURN_NONE;
  }
  return PyObject_CallMethod(self->recorder, "_hook_outputs", "LLO", static_cast<long long>(frame.call),
                             static_cast<long long>(frame.index), output);
}

// reset(): the hooks were taken off; forget open forwards (call numbers go on).
PyObject* hooks_reset(PyObject* obj, PyObject*) {
  auto* self = reinterpret_cast<HooksObject*>(obj);
  self->stack->clear();
  Py_RETURN_NONE;
}

PyMethodDef hooks_methods[] = {
    {"pre_forward", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(hooks_pre_forward)), METH_FASTCALL,
     "global forward pre-hook"},
    {"post_forward", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(hooks_post_forward)),
     METH_FASTCALL, "global forward hook (always called)"},
    {"reset", hooks_reset, METH_NOARGS, "forget open forwards"},
    {nullptr, nullptr, 0, nullptr},
};

PyObject* hooks_get_next_call(PyObject* obj, void*) {
  return PyLong_FromLongLong(reinterpret_cast<HooksObject*>(obj)->next_call);
}

PyGetSetDef hooks_getset[] = {
    {"next_call", hooks_get_next_call, nullptr, "the number the next module call gets", nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr},
};

PyTypeObject HooksType = [] {
  PyTypeObject type{PyVarObject_HEAD_INIT(nullptr, 0)};
  type.tp_name = "modtimeline._hotpath.ForwardHooks";
  type.tp_basicsize = sizeof(HooksObject);
  type.tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC;
  type.tp_doc = "ForwardHooks(store, recorder): a Recorder's compiled forward hooks";
  type.tp_new = hooks_new;
  type.tp_dealloc = reinterpret_cast<destructor>(hooks_dealloc);
  type.tp_traverse = reinterpret_cast<traverseproc>(hooks_traverse);
  type.tp_clear = reinterpret_cast<inquiry>(hooks_clear);
  type.tp_methods = hooks_methods;
  type.tp_getset = hooks_getset;
  return type;
}();

PyModuleDef hotpath_module = {
    PyModuleDef_HEAD_INIT, "modtimeline._hotpath", "modtimeline's compiled recording hot path", -1,
    nullptr,               nullptr,                nullptr,                                     nullptr,
    nullptr,
};

}  // namespace

PyMODINIT_FUNC PyInit__hotpath() {
  if (PyType_Ready(&StoreType) < 0 || PyType_Ready(&HooksType) < 0) return nullptr;
  PyObject* module = PyModule_Create(&hotpath_module);
  if (module == nullptr) return nullptr;
  if (PyModule_AddObjectRef(module, "Store", reinterpret_cast<PyObject*>(&StoreType)) < 0 ||
      PyModule_AddObjectRef(module, "ForwardHooks", reinterpret_cast<PyObject*>(&HooksType)) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
