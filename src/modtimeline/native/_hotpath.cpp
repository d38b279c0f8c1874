// The recording hot path of modtimeline's Recorder, compiled (optional; recorder.py
// holds the same logic in Python and uses it when this module is not built).
//
// Two Python types,
//
//   Store(capacity)      the event buffer: host timestamps and packed codes, node links,
//                        as buffer.EventBuffer (same layout and capacity rules).
//   ForwardHooks(store, callbacks)
//                        the global forward pre/post hooks of one Recorder: module
//                        index lookup, call numbering, the forward stack and the thread
//                        filter, and the walk of each call's autograd nodes that links
//                        its backward, exactly as recorder.PythonForwardHooks; module
//                        naming, outputs other than one tensor and a raised forward call
//                        the documented callbacks of recorder.RecorderCallbacks.
//
// and the functions torch calls as its global forward hooks, dispatch_pre/dispatch_post,
// which call the hooks compile_guard configures (configure_dispatch).
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

#include <ATen/SequenceNumber.h>
#include <c10/core/GradMode.h>

#include "_device_marks.h"
#include "_layout.h"
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/graph_task.h>
#include <ATen/functorch/BatchedTensorImpl.h>
#include <torch/csrc/autograd/python_variable.h>

#include <time.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <memory>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace {

using namespace modtimeline_layout;  // every constant shared with Python (_layout.h)

// The interface of Store, ForwardHooks and the dispatch functions (capture/recorder.py HOTPATH_API).
constexpr long long HOTPATH_API = 4;

inline bool is_begin(int64_t kind) {
  return kind == FORWARD_BEGIN || kind == RECOMPUTE_BEGIN || kind == STEP_BEGIN || kind == GRADIENT_READY;
}

inline int64_t now_ns() {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000LL + ts.tv_nsec;
}

// The locks here: held for an append or one call's links (a few µs at the most; a flush
// also copies the columns out under it, allocating their bytes), never across a Python
// call, the GIL or another wait; taken about five times a module call (forward and
// backward), and almost never contended: autograd's threads append while the owner's
// forward waits for its backward. A pthread mutex pair cost ~30 ns of each; this is one
// atomic exchange and a store. A waiter spins, then yields to a holder that lost its core,
// then sleeps in 50 µs naps (a flush's copy, milliseconds, on an oversubscribed host).
class SpinLock {
 public:
  void lock() {
    while (held_.exchange(true, std::memory_order_acquire)) {
      for (int spins = 0; held_.load(std::memory_order_relaxed); ++spins) {
        if (spins >= 1024) {
          std::this_thread::sleep_for(std::chrono::microseconds(50));
        } else if (spins >= 64) {
          std::this_thread::yield();
        }
      }
    }
  }
  void unlock() { held_.store(false, std::memory_order_release); }

 private:
  std::atomic<bool> held_{false};
};

// Adding a pre-hook to a node and looking for ours must not race with another store
// doing the same on the same node (two Timelines in two threads over one shared
// parameter): node pre-hook lists have no lock of their own.
SpinLock node_hooks_lock;

// A mark's state, one atomic word: the generation it was armed in, and its node id.
constexpr uint64_t pack_mark(uint64_t generation, int64_t node_id) {
  return (generation << 32) | static_cast<uint32_t>(node_id);
}

// The stores whose device marker this thread is inside now, innermost last (a mark can
// run Python, and Python can mark again): detach_marker must not wait for its own thread.
class MarkingHere {
 public:
  explicit MarkingHere(const void* store) { stack().push_back(store); }
  ~MarkingHere() { stack().pop_back(); }
  MarkingHere(const MarkingHere&) = delete;
  MarkingHere& operator=(const MarkingHere&) = delete;
  static int64_t depth(const void* store) {
    int64_t count = 0;
    for (const void* each : stack()) count += each == store;
    return count;
  }

 private:
  static std::vector<const void*>& stack() {
    thread_local std::vector<const void*> inside;
    return inside;
  }
};

// The events, shared by the Store object and every node mark (a graph can outlive
// the Store; its marks then keep this alive, emptied, and record into nothing visible).
struct Events : std::enable_shared_from_this<Events> {
  SpinLock lock;  // node marks fire on autograd's threads, without the GIL
  std::vector<int64_t> timestamps, codes, link_node, link_code;
  int64_t capacity = 0, hard_limit = 0, dropped = 0, nodes = 0;
  // Bumped by clear()/retire_marks(): marks armed in an older generation are stale and
  // record nothing until link() re-arms them. Only the low 32 bits are compared.
  uint64_t generation = 0;
  // The backward passes running: (autograd graph task id, pass number) of each graph task
  // our marks fired in whose end callback has not run yet. Node events and BACKWARD_DONE
  // carry the pass number (in the module field), so resolve closes each pass's spans at
  // its own end. A pass that raised never runs its callback: it stays here (never matched
  // again: task ids are not reused) until the list is full, oldest first, or the store is
  // cleared. A forward on another thread inside one of these passes is activation-
  // checkpoint recompute of ours.
  std::vector<std::pair<int64_t, int64_t>> running_passes;
  int64_t passes = 0;
  static constexpr size_t MAX_RUNNING_PASSES = 1024;
  std::atomic<PyObject*> on_recorded{nullptr};  // owned reference; changed with the GIL held
  // A compiled device marker (_device_marks.h) told of every stored event before
  // on_recorded, without the GIL; its owner object is held by the Store. Set and unset
  // with the GIL held; `marking` counts the calls inside it.
  std::atomic<const device_marker*> marker{nullptr};
  std::atomic<int64_t> marking{0};
  // Compiled autograd met our marks (it asks every node hook to describe itself): that
  // backward runs as a compiled graph without them, so its spans go unrecorded.
  std::atomic<bool> compiled_autograd_seen{false};

  uint32_t current() const { return static_cast<uint32_t>(generation); }

  // Append one event; the caller holds `lock`. Returns its index, or -1 if dropped.
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
    std::lock_guard<SpinLock> guard(lock);
    return append_locked(kind, call, module);
  }

  // Tell the device marker of stored event `index`, from any thread, GIL or not. The
  // calls in flight are counted (sequentially consistent with the marker's store), so
  // detach_marker() knows when none can still be inside the marker it took away.
  void mark_on_device(int64_t index, int64_t kind, int64_t module) {
    if (index < 0 || marker.load() == nullptr) return;  // (no marker, the usual case: no atomic write)
    marking.fetch_add(1);
    if (const device_marker* device = marker.load()) {
      MarkingHere here(this);
      device->mark(device->state, index, kind, module);
    }
    marking.fetch_sub(1);
  }

  // Take the device marker away; the GIL held. True once no call is inside it (the GIL is
  // let go while waiting, since a mark may need it, and the marker taken again after: a
  // setter on another thread may have set one meanwhile). False when this thread itself
  // is inside a mark (Python the marker called, a collection in it, dropped the marker):
  // waiting would never end, and the marker's owner must then outlive that mark.
  bool detach_marker() {
    for (;;) {
      if (marker.exchange(nullptr) == nullptr && marking.load() == 0) return true;
      int64_t own = MarkingHere::depth(this);
      if (marking.load() <= own) return own == 0;
      if (own > 0) return false;  // (others' calls cannot be waited for under our own)
      Py_BEGIN_ALLOW_THREADS
      while (marking.load() != 0) std::this_thread::yield();
      Py_END_ALLOW_THREADS
    }
  }

  // Tell on_recorded (NVTX, the device clock where Python marks) about event `index`:
  // (index, kind, module, call); node events have their pass as module and the node's id
  // as call. The caller holds the GIL and has told the device marker already.
  bool call_on_recorded(int64_t index, int64_t kind, int64_t module, int64_t call) {
    if (index < 0 || on_recorded.load() == nullptr) return true;
    // (held across the call: Python in it may set another on_recorded, freeing this one)
    PyObject* callback = Py_XNewRef(on_recorded.load());
    if (callback == nullptr) return true;
    PyObject* result = PyObject_CallFunction(callback, "LLLL", static_cast<long long>(index),
                                             static_cast<long long>(kind), static_cast<long long>(module),
                                             static_cast<long long>(call));
    Py_DECREF(callback);
    Py_XDECREF(result);
    return result != nullptr;
  }

  // Store one event and tell the device marker and on_recorded; the caller holds the GIL.
  // False: on_recorded raised.
  bool record(int64_t kind, int64_t call, int64_t module) {
    int64_t index = append(kind, call, module);
    mark_on_device(index, kind, module);
    return call_on_recorded(index, kind, module, call);
  }

  // Tell on_recorded from any thread, holding the GIL or not (autograd's threads do not);
  // an error in it cannot propagate into autograd, so it is reported as unraisable.
  void notify(int64_t index, int64_t kind, int64_t module, int64_t call) {
    mark_on_device(index, kind, module);
    if (index < 0 || on_recorded.load() == nullptr) return;
    PyGILState_STATE state = PyGILState_Ensure();
    if (!call_on_recorded(index, kind, module, call)) PyErr_WriteUnraisable(nullptr);
    PyGILState_Release(state);
  }

  // The pass of graph task `task`, a new one if none runs yet; `is_new` says so. The
  // caller holds `lock`.
  int64_t pass_of_locked(int64_t task, bool* is_new) {
    for (const auto& running : running_passes) {
      if (running.first == task) return running.second;
    }
    if (running_passes.size() >= MAX_RUNNING_PASSES) running_passes.erase(running_passes.begin());
    running_passes.emplace_back(task, passes);
    *is_new = true;
    return passes++;
  }

  // On autograd's thread inside a backward: a marked node is about to run
  // (GRADIENT_READY) or has run (NODE_DONE). The first event of a pass queues its
  // BACKWARD_DONE (an engine callback, run when that graph task completes).
  // `mark_generation`: a mark's generation, checked under the same lock as the append (a
  // clear or retire from another thread in between must not let a stale mark record).
  void node_event(int64_t kind, int64_t node_id, const uint32_t* mark_generation = nullptr) {
    int64_t index, pass, task = torch::autograd::get_current_graph_task_id();
    bool is_new = false;
    uint64_t generation_now;
    {
      std::lock_guard<SpinLock> guard(lock);
      if (mark_generation != nullptr && *mark_generation != current()) return;
      generation_now = generation;
      pass = pass_of_locked(task, &is_new) & MODULE_MASK;
      index = append_locked(kind, node_id, pass);
    }
    if (is_new && task != -1) {
      std::weak_ptr<Events> self = weak_from_this();
      torch::autograd::Engine::get_default_engine().queue_callback([self, generation_now, task] {
        if (auto events = self.lock()) events->backward_done(generation_now, task);
      });
    }
    notify(index, kind, pass, node_id);
  }

  // A marked node fired: record it if the mark is of this generation.
  void mark_fired(int64_t kind, uint64_t mark) {
    uint32_t mark_generation = static_cast<uint32_t>(mark >> 32);
    node_event(kind, static_cast<int64_t>(mark & 0xffffffffu), &mark_generation);
  }

  void backward_done(uint64_t generation_then, int64_t task) {
    int64_t index = -1, pass;
    {
      std::lock_guard<SpinLock> guard(lock);
      if (generation_then != generation) return;  // cleared meanwhile: the pass is gone
      auto found = std::find_if(running_passes.begin(), running_passes.end(),
                                [task](const auto& running) { return running.first == task; });
      if (found == running_passes.end()) return;  // dropped from a full list
      pass = found->second & MODULE_MASK;
      running_passes.erase(found);
      index = append_locked(BACKWARD_DONE, 0, pass);
    }
    notify(index, BACKWARD_DONE, pass, 0);
  }

  bool serves(int64_t task) {
    std::lock_guard<SpinLock> guard(lock);
    return std::any_of(running_passes.begin(), running_passes.end(),
                       [task](const auto& running) { return running.first == task; });
  }

  void clear() {
    std::lock_guard<SpinLock> guard(lock);
    timestamps = {};
    codes = {};
    link_node = {};
    link_code = {};
    nodes = 0;
    dropped = 0;
    retire_locked();
  }

  // Every mark placed so far goes stale (the recorder stopped). Marks are never taken off
  // their nodes: another thread's engine may be iterating a node's pre-hooks right now
  // (erasing them crashed the process), and a node holds at most one mark per store,
  // re-armed when a later step links it again.
  void retire_marks() {
    std::lock_guard<SpinLock> guard(lock);
    retire_locked();
  }

  void retire_locked() {
    ++generation;
    running_passes.clear();
  }

  // Link `node` to a call boundary: `done` (the call's backward may end when it has run)
  // or not (it begins when the node is about to run). Arms this store's mark on it. The
  // caller holds node_hooks_lock and `lock` (link_call takes them once per call).
  void link_locked(torch::autograd::Node* node, int64_t link, bool done);
};

// Node marks are made by the thousand a step (in the forward) and freed with their graph
// (after the backward, on whichever thread lets it go), thousands at once: more than
// malloc's per-thread caches hold, so each free and the next step's mallocs took its slow
// paths (~0.4 µs a module call on tiny modules, with torch's own allocations; perf). A free
// list of mark-sized blocks keeps the marks out of malloc.
class MarkBlocks {
 public:
  static constexpr size_t SIZE = 64;       // bytes a block (either mark fits: static_assert below)
  static constexpr size_t MOST = 1 << 20;  // blocks kept for reuse (64 MiB at most)

  void* take() {
    {
      std::lock_guard<SpinLock> guard(lock_);
      if (!free_.empty()) {
        void* block = free_.back();
        free_.pop_back();
        return block;
      }
    }
    return ::operator new(SIZE);
  }

  void give(void* block) {
    {
      std::lock_guard<SpinLock> guard(lock_);
      if (free_.size() < MOST) {
        free_.push_back(block);
        return;
      }
    }
    ::operator delete(block);
  }

 private:
  SpinLock lock_;
  std::vector<void*> free_;
};

// (never destroyed: a graph alive at exit frees its marks after static destructors ran)
MarkBlocks& mark_blocks() {
  static MarkBlocks* blocks = new MarkBlocks();
  return *blocks;
}

// The marks on one autograd node: a pre-hook (its gradient is ready, it is about to run)
// and a post-hook (it has run). Both carry the node's id for this generation.
struct NodeMark final : torch::autograd::FunctionPreHook {
  NodeMark(std::shared_ptr<Events> events, uint64_t state) : events(std::move(events)), state(state) {}
  static void* operator new(size_t) { return mark_blocks().take(); }
  static void operator delete(void* block) { mark_blocks().give(block); }

  torch::autograd::variable_list operator()(const torch::autograd::variable_list& grads) override {
    events->mark_fired(GRADIENT_READY, state.load(std::memory_order_acquire));
    return grads;
  }

  // Compiled autograd asks each hook to describe itself for its graph; only Python hooks
  // can (the default raises, out of the user's backward). A mark describes nothing, is
  // left out of the compiled backward, and says it was.
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs&) const override {
    events->compiled_autograd_seen.store(true, std::memory_order_relaxed);
  }

  std::shared_ptr<Events> events;
  std::atomic<uint64_t> state;  // pack_mark(generation, node id)
};

struct NodeDoneMark final : torch::autograd::FunctionPostHook {
  NodeDoneMark(std::shared_ptr<Events> events, uint64_t state) : events(std::move(events)), state(state) {}
  static void* operator new(size_t) { return mark_blocks().take(); }
  static void operator delete(void* block) { mark_blocks().give(block); }

  torch::autograd::variable_list operator()(const torch::autograd::variable_list& grad_inputs,
                                            const torch::autograd::variable_list&) override {
    events->mark_fired(NODE_DONE, state.load(std::memory_order_acquire));
    return grad_inputs;
  }

  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs&) const override {  // (as NodeMark's)
    events->compiled_autograd_seen.store(true, std::memory_order_relaxed);
  }

  std::shared_ptr<Events> events;
  std::atomic<uint64_t> state;
};

static_assert(sizeof(NodeMark) <= MarkBlocks::SIZE && sizeof(NodeDoneMark) <= MarkBlocks::SIZE,
              "a mark must fit a block");

template <class Mark, class Hooks>
Mark* find_mark(const Hooks& hooks, const Events* events) {
  for (const auto& hook : hooks) {
    // (the mark types are final: comparing the type is a dynamic_cast without its walk)
    if (typeid(*hook) != typeid(Mark)) continue;
    auto* mark = static_cast<Mark*>(hook.get());
    if (mark->events.get() == events) return mark;
  }
  return nullptr;
}

void Events::link_locked(torch::autograd::Node* node, int64_t link, bool done) {
  NodeMark* before = find_mark<NodeMark>(node->pre_hooks(), this);
  NodeDoneMark* after = find_mark<NodeDoneMark>(node->post_hooks(), this);
  auto armed = [this](auto* mark) { return mark != nullptr && (mark->state.load() >> 32) == current(); };
  int64_t node_id;
  if (armed(before)) {
    node_id = static_cast<int64_t>(before->state.load() & 0xffffffffu);
  } else if (armed(after)) {
    node_id = static_cast<int64_t>(after->state.load() & 0xffffffffu);
  } else {
    node_id = nodes++;
  }
  uint64_t state = pack_mark(current(), node_id);
  if (done) {
    if (after == nullptr) {
      node->add_post_hook(std::make_unique<NodeDoneMark>(shared_from_this(), state));
    } else if (!armed(after)) {
      after->state.store(state, std::memory_order_release);
    }
  } else {
    if (before == nullptr) {
      node->add_pre_hook(std::make_unique<NodeMark>(shared_from_this(), state));
    } else if (!armed(before)) {
      before->state.store(state, std::memory_order_release);
    }
  }
  link_node.push_back(node_id);
  link_code.push_back(link);
}

inline int64_t link_code(int64_t call, int64_t index, bool begins) {
  return call << LINK_SHIFT | index << 1 | (begins ? LINK_BEGIN : 0);
}

// Link one call's backward: the autograd nodes its forward created are those with a
// sequence number in [first, last) (numbers are per thread, and the forward ran on this
// one). Its backward begins when the first of its output nodes in that range is about to
// run, and ends when the last of the range's *sinks* (nodes none of whose edges stays in
// the range) has run: a node with a successor in the range runs before that successor.
// Outputs outside the range (a module returning its input) add nothing: a call that
// created no node has no backward.
void link_call(Events& events, const std::vector<torch::autograd::Node*>& outputs, int64_t call, int64_t index,
               uint64_t first, uint64_t last) {
  auto inside = [first, last](const torch::autograd::Node* node) {
    uint64_t number = node->sequence_nr();
    return number >= first && number < last;
  };
  // Every node met is queued once. The nodes of the range have numbers in [first, last),
  // so whether one was met is a look at its number's slot (`slots`, all empty between
  // calls); a hash set serves a range too long for slots, and the rare node that shares
  // its number with another one (a node made with a number given, not drawn).
  constexpr uint64_t MOST_SLOTS = 4 * static_cast<uint64_t>(SUBGRAPH_BUDGET);
  // (per thread, kept between calls: no allocation per call once they have grown; this
  // function calls no Python, so nothing re-enters it on this thread meanwhile)
  thread_local std::vector<torch::autograd::Node*> queue, sinks, slots;
  queue.clear();
  sinks.clear();
  bool direct = last - first <= MOST_SLOTS;
  if (direct && slots.size() < last - first) slots.resize(last - first, nullptr);
  std::unordered_set<torch::autograd::Node*> seen;
  auto first_sight = [&seen, direct, first](torch::autograd::Node* node) {
    if (direct) {
      torch::autograd::Node*& slot = slots[node->sequence_nr() - first];
      if (slot == node) return;
      if (slot == nullptr) {
        slot = node;
      } else if (!seen.insert(node).second) {
        return;
      }
    } else if (!seen.insert(node).second) {
      return;
    }
    queue.push_back(node);
  };
  for (auto* node : outputs) {
    if (inside(node)) first_sight(node);
  }
  size_t begins = queue.size();
  for (size_t head = 0; head < queue.size(); ++head) {
    if (queue.size() > static_cast<size_t>(SUBGRAPH_BUDGET)) {
      sinks.clear();
      break;
    }
    torch::autograd::Node* node = queue[head];
    bool sink = true;
    for (const auto& edge : node->next_edges()) {
      torch::autograd::Node* next = edge.function.get();
      if (next != nullptr && inside(next)) {
        sink = false;
        first_sight(next);
      }
    }
    if (sink) sinks.push_back(node);
  }
  if (direct) {
    for (auto* node : queue) {
      if (inside(node)) slots[node->sequence_nr() - first] = nullptr;  // (a number never changes here; checked anyway)
    }
  }
  if (begins == 0 && sinks.empty()) return;
  std::lock_guard<SpinLock> node_guard(node_hooks_lock);
  std::lock_guard<SpinLock> guard(events.lock);
  // A full buffer: this call's backward goes unrecorded, as its events do.
  if (static_cast<int64_t>(events.codes.size()) >= events.capacity) return;
  for (size_t i = 0; i < begins; ++i) events.link_locked(queue[i], link_code(call, index, true), false);
  for (auto* node : sinks) events.link_locked(node, link_code(call, index, false), true);
}

// ------------------------------------------------------------------------ Store

struct StoreObject {
  PyObject_HEAD
  std::shared_ptr<Events>* events;
  PyObject* device_marker;  // the owner of events->marker (owned), or nullptr
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

// The Store is garbage-collected: its two callbacks hold what holds it (a bound method
// of the device clock, of the Timeline that owns this Store), a cycle plain reference
// counting never frees.
int store_traverse(StoreObject* self, visitproc visit, void* arg) {
  if (self->events != nullptr) Py_VISIT((*self->events)->on_recorded.load());
  Py_VISIT(self->device_marker);
  return 0;
}

int store_clear_callbacks(StoreObject* self) {
  bool unused = true;
  if (self->events != nullptr) {
    unused = (*self->events)->detach_marker();  // (no call left inside it: its owner may go now)
    Py_XDECREF((*self->events)->on_recorded.exchange(nullptr));
  }
  if (unused) {
    Py_CLEAR(self->device_marker);
  } else {
    self->device_marker = nullptr;  // (a mark of this thread is inside it: its owner is left to leak)
  }
  return 0;
}

void store_dealloc(StoreObject* self) {
  PyObject_GC_UnTrack(self);
  store_clear_callbacks(self);
  if (self->events != nullptr) {
    (*self->events)->clear();  // marks left on retained graphs keep only an empty shell
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

PyObject* bytes_of(const std::vector<int64_t>& column) {
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(column.data()),
                                   static_cast<Py_ssize_t>(column.size() * sizeof(int64_t)));
}

// columns() -> (timestamps, codes, link_node, link_code) as bytes of native int64.
PyObject* store_columns(PyObject* self, PyObject*) {
  Events& events = events_of(self);
  std::lock_guard<SpinLock> guard(events.lock);
  return Py_BuildValue("(NNNN)", bytes_of(events.timestamps), bytes_of(events.codes), bytes_of(events.link_node),
                       bytes_of(events.link_code));
}

// links(start) -> (link_node, link_code) from link `start` on, as bytes of native int64.
PyObject* store_links(PyObject* self, PyObject* arg) {
  Py_ssize_t start = PyLong_AsSsize_t(arg);
  if (start == -1 && PyErr_Occurred()) return nullptr;
  Events& events = events_of(self);
  std::lock_guard<SpinLock> guard(events.lock);
  size_t from = std::min(static_cast<size_t>(std::max<Py_ssize_t>(start, 0)), events.link_node.size());
  size_t count = events.link_node.size() - from;
  return Py_BuildValue(
      "(NN)",
      PyBytes_FromStringAndSize(reinterpret_cast<const char*>(events.link_node.data() + from),
                                static_cast<Py_ssize_t>(count * sizeof(int64_t))),
      PyBytes_FromStringAndSize(reinterpret_cast<const char*>(events.link_code.data() + from),
                                static_cast<Py_ssize_t>(count * sizeof(int64_t))));
}

// synthetic_node(link) -> node id: a node id of no autograd node, with one link, for
// marks placed from Python (compiled_detail.py: the module boundaries inside compiled
// regions); -1 when the buffer is full (that call's backward goes unrecorded).
PyObject* store_synthetic_node(PyObject* self, PyObject* arg) {
  int64_t link = PyLong_AsLongLong(arg);
  if (link == -1 && PyErr_Occurred()) return nullptr;
  Events& events = events_of(self);
  std::lock_guard<SpinLock> guard(events.lock);
  if (static_cast<int64_t>(events.codes.size()) >= events.capacity) return PyLong_FromLong(-1);
  int64_t node = events.nodes++;
  events.link_node.push_back(node);
  events.link_code.push_back(link);
  return PyLong_FromLongLong(node);
}

// node_event(kind, node): a node event from Python (compiled_detail.py's synthetic
// nodes), in the backward pass that is running, as a mark's would be.
PyObject* store_node_event(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2) {
    PyErr_SetString(PyExc_TypeError, "expected (kind, node)");
    return nullptr;
  }
  int64_t kind = PyLong_AsLongLong(args[0]), node = PyLong_AsLongLong(args[1]);
  if (PyErr_Occurred()) return nullptr;
  events_of(self).node_event(kind, node);
  Py_RETURN_NONE;
}

PyObject* store_clear(PyObject* self, PyObject*) {
  events_of(self).clear();
  Py_RETURN_NONE;
}

PyObject* store_retire_marks(PyObject* self, PyObject*) {
  events_of(self).retire_marks();
  Py_RETURN_NONE;
}

PyObject* store_bytes_used(PyObject* self, PyObject*) {
  Events& events = events_of(self);
  std::lock_guard<SpinLock> guard(events.lock);
  size_t slots = events.timestamps.capacity() + events.codes.capacity() + events.link_node.capacity() +
                 events.link_code.capacity();
  return PyLong_FromSize_t(slots * sizeof(int64_t));
}

PyObject* store_now(PyObject*, PyObject*) { return PyLong_FromLongLong(now_ns()); }

Py_ssize_t store_len(PyObject* self) {
  Events& events = events_of(self);
  std::lock_guard<SpinLock> guard(events.lock);
  return static_cast<Py_ssize_t>(events.codes.size());
}

PyObject* store_get_capacity(PyObject* self, void*) { return PyLong_FromLongLong(events_of(self).capacity); }
PyObject* store_get_dropped(PyObject* self, void*) {
  Events& events = events_of(self);
  std::lock_guard<SpinLock> guard(events.lock);
  return PyLong_FromLongLong(events.dropped);
}
PyObject* store_get_nodes(PyObject* self, void*) {
  Events& events = events_of(self);
  std::lock_guard<SpinLock> guard(events.lock);
  return PyLong_FromLongLong(events.nodes);
}

PyObject* store_get_compiled_autograd_seen(PyObject* self, void*) {
  return PyBool_FromLong(events_of(self).compiled_autograd_seen.load(std::memory_order_relaxed));
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

PyObject* store_get_device_marker(PyObject* self, void*) {
  PyObject* owner = reinterpret_cast<StoreObject*>(self)->device_marker;
  return Py_NewRef(owner != nullptr ? owner : Py_None);
}

// device_marker = an object whose `capsule` holds a device_marker table (_device_marks.h), or None.
int store_set_device_marker(PyObject* self, PyObject* value, void*) {
  const device_marker* table = nullptr;
  if (value != nullptr && value != Py_None) {
    PyObject* capsule = PyObject_GetAttrString(value, "capsule");
    if (capsule == nullptr) return -1;
    table = static_cast<const device_marker*>(PyCapsule_GetPointer(capsule, DEVICE_MARKER_CAPSULE));
    Py_DECREF(capsule);
    if (table == nullptr) return -1;
  }
  auto* store = reinterpret_cast<StoreObject*>(self);
  bool unused = events_of(self).detach_marker();  // (no call left inside the one it replaces)
  PyObject* replaced = store->device_marker;
  store->device_marker = table != nullptr ? Py_NewRef(value) : nullptr;
  events_of(self).marker.store(table);
  if (unused) Py_XDECREF(replaced);  // (else a mark of this thread is inside it: its owner is left to leak)
  return 0;
}

PyMethodDef store_methods[] = {
    {"record", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(store_record)), METH_FASTCALL,
     "record(kind, call, module): store one event stamped now"},
    {"columns", store_columns, METH_NOARGS, "(timestamps, codes, link_node, link_code) as int64 bytes"},
    {"links", store_links, METH_O, "links(start): (link_node, link_code) from link start on, as int64 bytes"},
    {"synthetic_node", store_synthetic_node, METH_O, "synthetic_node(link) -> a new node id linked to `link` (-1: full)"},
    {"clear", store_clear, METH_NOARGS, "drop every event and link; node marks already placed go stale"},
    {"retire_marks", store_retire_marks, METH_NOARGS, "make every mark placed so far stale (the recorder stopped)"},
    {"node_event", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(store_node_event)), METH_FASTCALL,
     "node_event(kind, node): a node event in the running backward pass"},
    {"bytes_used", store_bytes_used, METH_NOARGS, "bytes allocated for events and links"},
    {"now", store_now, METH_NOARGS | METH_STATIC, "the clock events are stamped with, in ns"},
    {nullptr, nullptr, 0, nullptr},
};

PyGetSetDef store_getset[] = {
    {"capacity", store_get_capacity, nullptr, "events held at most", nullptr},
    {"dropped", store_get_dropped, nullptr, "events dropped since the last clear", nullptr},
    {"nodes", store_get_nodes, nullptr, "autograd nodes given an id since the last clear", nullptr},
    {"compiled_autograd_seen", store_get_compiled_autograd_seen, nullptr,
     "whether compiled autograd ran a backward past our marks (they record nothing there)", nullptr},
    {"on_recorded", store_get_on_recorded, store_set_on_recorded, "called with (index, kind, module, call) of each stored event",
     nullptr},
    {"device_marker", store_get_device_marker, store_set_device_marker,
     "a compiled device marker told of each stored event first (_device_marks.h), or None", nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr},
};

PySequenceMethods store_sequence = {store_len};

PyTypeObject StoreType = [] {
  PyTypeObject type{PyVarObject_HEAD_INIT(nullptr, 0)};
  type.tp_name = "modtimeline.native._hotpath.Store";
  type.tp_basicsize = sizeof(StoreObject);
  type.tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC;
  type.tp_doc = "Store(capacity): the compiled event buffer";
  type.tp_new = store_new;
  type.tp_dealloc = reinterpret_cast<destructor>(store_dealloc);
  type.tp_traverse = reinterpret_cast<traverseproc>(store_traverse);
  type.tp_clear = reinterpret_cast<inquiry>(store_clear_callbacks);
  type.tp_methods = store_methods;
  type.tp_getset = store_getset;
  type.tp_as_sequence = &store_sequence;
  return type;
}();

// --------------------------------------------------------------- ForwardHooks

struct Frame {
  // (owned while the frame is open: a forward that ends by KeyboardInterrupt skips our
  // post-hook and leaves its frame, whose module may die and its address be reused)
  PyObject* module;
  int64_t call;
  int64_t index;
  bool recompute;
  uint64_t first_node;  // the sequence number the first autograd node of this call gets
};

// The index of each module seen, by the module's address: open addressing (linear
// probing, a power-of-two size, at most half full, entries never removed; a dead module's
// entry is taken over when its address comes back). Looked up on every module call; a
// std::unordered_map lookup (a division by a prime and a pointer chase) was 0.14 µs of it.
class ModuleTable {
 public:
  struct Entry {
    PyObject* module = nullptr;  // the address it was learned at (borrowed: not a reference)
    PyObject* ref = nullptr;     // weak reference to the module (owned)
    int64_t index = 0;
  };

  ModuleTable() : entries_(64) {}
  ~ModuleTable() { clear(); }
  ModuleTable(const ModuleTable&) = delete;
  ModuleTable& operator=(const ModuleTable&) = delete;

  // Whether the live `module` is known (not only its address, a dead module's), and as what.
  bool find(PyObject* module, int64_t* index) const {
    const Entry& entry = entries_[slot(module)];
    if (entry.module != module || PyWeakref_GetObject(entry.ref) != module) return false;
    *index = entry.index;
    return true;
  }

  // Know `module` (alive, and `ref` a new weak reference to it) as `index`; takes `ref`.
  void put(PyObject* module, PyObject* ref, int64_t index) {
    Entry& entry = entries_[slot(module)];
    if (entry.module == module) {
      Py_DECREF(entry.ref);  // a dead module's address, reused
      entry.ref = ref;
      entry.index = index;
      return;
    }
    entry = {module, ref, index};
    if (++used_ * 2 > entries_.size()) grow();
  }

  void clear() {
    for (auto& entry : entries_) Py_XDECREF(entry.ref);
    std::fill(entries_.begin(), entries_.end(), Entry{});
    used_ = 0;
  }

 private:
  // Where `module` is, or the empty entry where it would go.
  size_t slot(PyObject* module) const {
    size_t mask = entries_.size() - 1;
    // (Fibonacci hashing: object addresses are 16-byte aligned and close together)
    size_t at = static_cast<size_t>((reinterpret_cast<uintptr_t>(module) >> 4) * 0x9E3779B97F4A7C15ull >> 20) & mask;
    while (entries_[at].module != module && entries_[at].module != nullptr) at = (at + 1) & mask;
    return at;
  }

  void grow() {
    std::vector<Entry> old(entries_.size() * 2);
    old.swap(entries_);
    for (const auto& entry : old) {
      if (entry.module != nullptr) entries_[slot(entry.module)] = entry;
    }
  }

  std::vector<Entry> entries_;  // (size a power of two)
  size_t used_ = 0;
};

// The recorder side of the hooks: an object with the documented callback methods of
// recorder.RecorderCallbacks (learn, tensors, forward_raised).
struct HooksObject {
  PyObject_HEAD
  PyObject* store;      // StoreObject
  PyObject* callbacks;  // recorder.RecorderCallbacks
  int64_t next_call;
  unsigned long owner;  // the thread whose forwards are recorded
  // Between two recorded steps the hooks stay in torch, paused: taking them off and on
  // again costs a step ~0.3 ms (torch's hook dictionaries, Module._call_impl put back and
  // swapped again, which makes every module class look its attributes up anew).
  bool paused;
  // The module whose call begin_call() began (owned), or nullptr: a step that begins at a
  // module call from a global pre-hook placed before ours, whose own pre-hook then still
  // runs for that call and must not begin it twice. Cleared by the owner thread's next
  // hook of any call.
  PyObject* begun;
  std::vector<Frame>* stack;
  // Recompute frames of other threads (autograd's device threads run checkpoint recompute).
  std::unordered_map<unsigned long, std::vector<Frame>>* other_stacks;
  ModuleTable* modules;
};

PyObject* hooks_new(PyTypeObject* type, PyObject* args, PyObject* kwargs) {
  static const char* keywords[] = {"store", "callbacks", nullptr};
  PyObject *store, *callbacks;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!O", const_cast<char**>(keywords), &StoreType, &store,
                                   &callbacks))
    return nullptr;
  auto* self = reinterpret_cast<HooksObject*>(type->tp_alloc(type, 0));
  if (self == nullptr) return nullptr;
  Py_INCREF(store);
  Py_INCREF(callbacks);
  self->store = store;
  self->callbacks = callbacks;
  self->next_call = 0;
  self->owner = PyThread_get_thread_ident();
  self->paused = false;
  self->begun = nullptr;
  self->stack = new std::vector<Frame>();
  self->other_stacks = new std::unordered_map<unsigned long, std::vector<Frame>>();
  self->modules = new ModuleTable();
  return reinterpret_cast<PyObject*>(self);
}

// Drop the open frames and the module references they hold.
void drop_frames(HooksObject* self) {
  if (self->stack != nullptr) {
    for (const auto& frame : *self->stack) Py_DECREF(frame.module);
    self->stack->clear();
  }
  if (self->other_stacks != nullptr) {
    for (const auto& entry : *self->other_stacks) {
      for (const auto& frame : entry.second) Py_DECREF(frame.module);
    }
    self->other_stacks->clear();
  }
}

int hooks_traverse(HooksObject* self, visitproc visit, void* arg) {
  Py_VISIT(self->begun);
  Py_VISIT(self->store);
  Py_VISIT(self->callbacks);
  return 0;
}

int hooks_clear(HooksObject* self) {
  Py_CLEAR(self->begun);
  Py_CLEAR(self->store);
  Py_CLEAR(self->callbacks);
  return 0;
}

void hooks_dealloc(HooksObject* self) {
  PyObject_GC_UnTrack(self);
  hooks_clear(self);
  drop_frames(self);
  delete self->modules;
  delete self->stack;
  delete self->other_stacks;
  Py_TYPE(self)->tp_free(reinterpret_cast<PyObject*>(self));
}

// The module's index, learning it (in Python) on first sight; IGNORED for modules not
// recorded (the graphs torch.compile runs), -1 when learning raised.
constexpr int64_t IGNORED = -2;

int64_t index_of(HooksObject* self, PyObject* module) {
  int64_t known;
  if (self->modules->find(module, &known)) return known;
  static PyObject* name = PyUnicode_InternFromString("learn");
  if (name == nullptr) return -1;
  PyObject* learned = PyObject_CallMethodOneArg(self->callbacks, name, module);
  if (learned == nullptr) return -1;
  int64_t index = learned == Py_None ? IGNORED : PyLong_AsLongLong(learned);
  Py_DECREF(learned);
  if (index == -1 && PyErr_Occurred()) return -1;
  PyObject* ref = PyWeakref_NewRef(module, nullptr);
  if (ref == nullptr) return -1;
  self->modules->put(module, ref, index);
  return index;
}

// The autograd node that made `tensor`. Under torch.vmap a module returns a batched
// wrapper with no grad_fn of its own; autograd recorded the work on the tensor it wraps
// (tensors.autograd_node is the Python twin).
torch::autograd::Node* autograd_node(const at::Tensor& tensor) {
  const at::Tensor* inner = &tensor;
  while (!inner->grad_fn()) {
    auto* batched = at::functorch::maybeGetBatchedImpl(*inner);
    if (batched == nullptr) return nullptr;
    inner = &batched->value();
  }
  return inner->grad_fn().get();
}

// Whether tensors.grad_tensors' walk would leave `value`, an item of a mapping, alone (a
// scalar, a string, or an object that is no container it enters: a transformers Cache);
// 1 yes, 0 no (a tensor or a container: the walk is the callbacks'), -1 error.
int walk_skips(PyObject* value) {
  if (value == Py_None || PyLong_Check(value) || PyFloat_Check(value) || PyUnicode_Check(value) ||
      PyBytes_Check(value)) {
    return 1;
  }
  if (THPVariable_Check(value) || PyTuple_Check(value) || PyList_Check(value) || PyDict_Check(value)) return 0;
  static PyObject* mapping = [] {
    PyObject* abc = PyImport_ImportModule("collections.abc");
    PyObject* found = abc == nullptr ? nullptr : PyObject_GetAttrString(abc, "Mapping");
    Py_XDECREF(abc);
    return found;  // (kept for the process)
  }();
  if (mapping == nullptr) return -1;
  int is_mapping = PyObject_IsInstance(value, mapping);
  if (is_mapping != 0) return is_mapping < 0 ? -1 : 0;
  // (dataclasses.is_dataclass: the type has __dataclass_fields__)
  int is_dataclass = PyObject_HasAttrString(reinterpret_cast<PyObject*>(Py_TYPE(value)), "__dataclass_fields__");
  return is_dataclass ? 0 : 1;
}

// The grad_fn of every tensor in `output` that has one: a tensor, a flat tuple or list, or
// a mapping (a ModelOutput) of tensors and things the walk leaves alone, here; anything
// else (nested, dataclasses) through the callbacks, as tensors.grad_tensors walks it.
// False: it raised.
bool output_nodes(HooksObject* self, PyObject* output, std::vector<torch::autograd::Node*>& nodes) {
  auto add = [&nodes](PyObject* tensor) {
    if (auto* node = autograd_node(THPVariable_Unpack(tensor))) nodes.push_back(node);
  };
  nodes.clear();
  if (THPVariable_Check(output)) {
    add(output);
    return true;
  }
  // A dict (ModelOutput is an OrderedDict) whose values are tensors, Nones and objects the
  // walk leaves alone (a model's cache): its values() in their order, as the walk takes them.
  if (PyDict_Check(output)) {
    PyObject* values = PyMapping_Values(output);
    if (values == nullptr) return false;
    bool flat = true;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(values) && flat; ++i) {
      PyObject* item = PyList_GET_ITEM(values, i);
      if (THPVariable_Check(item)) continue;
      int skips = walk_skips(item);
      if (skips < 0) {
        Py_DECREF(values);
        return false;
      }
      flat = skips == 1;
    }
    if (flat) {
      for (Py_ssize_t i = 0; i < PyList_GET_SIZE(values); ++i) {
        if (THPVariable_Check(PyList_GET_ITEM(values, i))) add(PyList_GET_ITEM(values, i));
      }
    }
    Py_DECREF(values);  // (the nodes stay alive: the output holds its tensors)
    if (flat) return true;
  }
  // A plain tuple or list of tensors and Nones (an attention's (output, None)) is walked
  // here; anything else in it, or any other container, by the callbacks.
  if (PyTuple_CheckExact(output) || PyList_CheckExact(output)) {
    PyObject** items = PySequence_Fast_ITEMS(output);
    Py_ssize_t size = PySequence_Fast_GET_SIZE(output);
    bool flat = true;
    for (Py_ssize_t i = 0; i < size && flat; ++i) flat = items[i] == Py_None || THPVariable_Check(items[i]);
    if (flat) {
      for (Py_ssize_t i = 0; i < size; ++i) {
        if (items[i] != Py_None) add(items[i]);
      }
      return true;
    }
  }
  // (CallMethodOneArg: with a "O" format, a tuple output would become the argument list)
  static PyObject* name = PyUnicode_InternFromString("tensors");
  if (name == nullptr) return false;
  PyObject* tensors = PyObject_CallMethodOneArg(self->callbacks, name, output);
  if (tensors == nullptr) return false;
  PyObject* fast = PySequence_Fast(tensors, "RecorderCallbacks.tensors must return a sequence");
  Py_DECREF(tensors);
  if (fast == nullptr) return false;
  nodes.clear();  // (again: the Python callback may have run a module call on this thread)
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(fast); ++i) {
    PyObject* item = PySequence_Fast_GET_ITEM(fast, i);
    if (THPVariable_Check(item)) add(item);
  }
  Py_DECREF(fast);  // (the nodes stay alive: the output tensors hold them)
  return true;
}

// Link the backward of the call that just returned `output` (a recomputed call's too: a
// reentrant checkpoint runs the backward of what it recomputed right after).
PyObject* link_output(HooksObject* self, Events& events, PyObject* output, const Frame& frame) {
  uint64_t last_node = at::sequence_number::peek();
  if (output == Py_None || last_node == frame.first_node) Py_RETURN_NONE;  // no node was made: no backward
  // (per thread, kept between calls: no allocation per call)
  thread_local std::vector<torch::autograd::Node*> nodes;
  if (!output_nodes(self, output, nodes)) return nullptr;
  link_call(events, nodes, frame.call, frame.index, frame.first_node, last_node);
  Py_RETURN_NONE;
}

// pre_forward(module, args): a module's forward begins.
PyObject* hooks_pre_forward(PyObject* obj, PyObject* const* args, Py_ssize_t nargs) {
  auto* self = reinterpret_cast<HooksObject*>(obj);
  if (nargs != 2) {
    PyErr_SetString(PyExc_TypeError, "pre_forward(module, args)");
    return nullptr;
  }
  if (self->paused) Py_RETURN_NONE;
  Events& events = events_of(self->store);
  int64_t task = torch::autograd::get_current_graph_task_id();
  unsigned long thread = PyThread_get_thread_ident();
  if (thread != self->owner) {
    // Another thread's forward is not ours, unless it is recompute inside our backward.
    if (task == -1 || !events.serves(task)) Py_RETURN_NONE;
    int64_t index = index_of(self, args[0]);
    if (index == IGNORED) Py_RETURN_NONE;
    if (index < 0) return nullptr;
    int64_t call = self->next_call++;
    if (!events.record(RECOMPUTE_BEGIN, call, index)) return nullptr;
    Py_INCREF(args[0]);
    (*self->other_stacks)[thread].push_back({args[0], call, index, true, at::sequence_number::peek()});
    Py_RETURN_NONE;
  }
  if (self->begun != nullptr) {
    bool begun_here = self->begun == args[0];
    Py_CLEAR(self->begun);
    if (begun_here) Py_RETURN_NONE;  // (begin_call began this call)
  }
  int64_t index = index_of(self, args[0]);
  if (index == IGNORED) Py_RETURN_NONE;
  if (index < 0) return nullptr;
  int64_t call = self->next_call++;
  if (task != -1) {
    // Forward inside backward: activation-checkpoint recompute.
    if (!events.record(RECOMPUTE_BEGIN, call, index)) return nullptr;
    Py_INCREF(args[0]);
    self->stack->push_back({args[0], call, index, true, at::sequence_number::peek()});
    Py_RETURN_NONE;
  }
  if (!events.record(FORWARD_BEGIN, call, index)) return nullptr;
  Py_INCREF(args[0]);
  self->stack->push_back({args[0], call, index, false, at::sequence_number::peek()});
  Py_RETURN_NONE;
}

// post_forward(module, args, output): a module's forward ended (output None if it raised).
PyObject* hooks_post_forward(PyObject* obj, PyObject* const* args, Py_ssize_t nargs) {
  auto* self = reinterpret_cast<HooksObject*>(obj);
  if (nargs != 3) {
    PyErr_SetString(PyExc_TypeError, "post_forward(module, args, output)");
    return nullptr;
  }
  if (self->paused) Py_RETURN_NONE;  // (pause() dropped every open forward)
  PyObject* output = args[2];
  unsigned long thread = PyThread_get_thread_ident();
  Events& events = events_of(self->store);
  if (thread != self->owner) {
    auto found = self->other_stacks->find(thread);
    if (found == self->other_stacks->end() || found->second.empty()) Py_RETURN_NONE;
    Frame frame = found->second.back();
    if (args[0] != frame.module) Py_RETURN_NONE;
    found->second.pop_back();
    Py_DECREF(frame.module);  // (args[0] holds it for this call)
    if (found->second.empty()) self->other_stacks->erase(found);
    if (!events.record(RECOMPUTE_END, frame.call, frame.index)) return nullptr;
    return link_output(self, events, output, frame);
  }
  Py_CLEAR(self->begun);
  auto& stack = *self->stack;
  if (stack.empty()) Py_RETURN_NONE;  // the forward began before the hooks were on
  Frame frame = stack.back();
  // A pre-hook of ours never ran for this module (another pre-hook raised): leave the
  // open entry rather than closing somebody else's span.
  if (args[0] != frame.module) Py_RETURN_NONE;
  stack.pop_back();
  Py_DECREF(frame.module);  // (args[0] holds it for this call)
  if (frame.recompute) {
    // (Non-reentrant checkpointing stops recompute early by raising: not a failure.)
    if (!events.record(RECOMPUTE_END, frame.call, frame.index)) return nullptr;
    return link_output(self, events, output, frame);
  }
  if (!events.record(FORWARD_END, frame.call, frame.index)) return nullptr;
  if (output == Py_None) {
    PyObject *type, *value, *traceback;
    PyErr_GetExcInfo(&type, &value, &traceback);
    bool raised = value != nullptr && value != Py_None;
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(traceback);
    if (raised) {  // the forward raised: torch calls us with no output
      return PyObject_CallMethod(self->callbacks, "forward_raised", "L", static_cast<long long>(frame.call));
    }
    Py_RETURN_NONE;
  }
  return link_output(self, events, output, frame);
}

// reset(): the hooks were taken off; forget open forwards (call numbers go on).
PyObject* hooks_reset(PyObject* obj, PyObject*) {
  auto* self = reinterpret_cast<HooksObject*>(obj);
  Py_CLEAR(self->begun);
  drop_frames(self);
  Py_RETURN_NONE;
}

// begin_call(module, args): a module call begins whose pre-hooks torch may have taken
// before recording was on (pre_forward then never runs for it) or not (a step begun by a
// global pre-hook ahead of ours while ours was paused: pre_forward runs for it next, and
// is then a no-op).
PyObject* hooks_begin_call(PyObject* obj, PyObject* const* args, Py_ssize_t nargs) {
  auto* self = reinterpret_cast<HooksObject*>(obj);
  PyObject* result = hooks_pre_forward(obj, args, nargs);
  // (Only the owner thread's calls honour it: another thread's would leave it to drop the
  // owner's next call of that module.)
  if (result != nullptr && !self->paused && PyThread_get_thread_ident() == self->owner) {
    Py_XSETREF(self->begun, Py_NewRef(args[0]));
  }
  return result;
}

// pause(): record no forward until resume(), forget open forwards (call numbers go on).
PyObject* hooks_pause(PyObject* obj, PyObject*) {
  reinterpret_cast<HooksObject*>(obj)->paused = true;
  return hooks_reset(obj, nullptr);
}

// resume(): record forwards again.
PyObject* hooks_resume(PyObject* obj, PyObject*) {
  reinterpret_cast<HooksObject*>(obj)->paused = false;
  Py_RETURN_NONE;
}

// own_thread(): record the calling thread's forwards from now on.
PyObject* hooks_own_thread(PyObject* obj, PyObject*) {
  reinterpret_cast<HooksObject*>(obj)->owner = PyThread_get_thread_ident();
  Py_RETURN_NONE;
}

// adopt(refs): know the module of refs[i] (a weak reference) as index i, for every one
// still alive: a new recorder takes over the indices of the one before it (registry.py,
// ModuleRegistry.continued) instead of learning each module again in Python.
PyObject* hooks_adopt(PyObject* obj, PyObject* refs) {
  auto* self = reinterpret_cast<HooksObject*>(obj);
  PyObject* fast = PySequence_Fast(refs, "adopt() takes a sequence of weak references");
  if (fast == nullptr) return nullptr;
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(fast); ++i) {
    PyObject* ref = PySequence_Fast_GET_ITEM(fast, i);
    if (!PyWeakref_CheckRef(ref)) {
      Py_DECREF(fast);
      PyErr_SetString(PyExc_TypeError, "adopt() takes a sequence of weak references");
      return nullptr;
    }
    PyObject* module = PyWeakref_GetObject(ref);  // borrowed; None once dead
    int64_t known;
    if (module == Py_None || self->modules->find(module, &known)) continue;
    PyObject* own = PyWeakref_NewRef(module, nullptr);
    if (own == nullptr) {
      Py_DECREF(fast);
      return nullptr;
    }
    self->modules->put(module, own, i);
  }
  Py_DECREF(fast);
  Py_RETURN_NONE;
}

PyMethodDef hooks_methods[] = {
    {"pre_forward", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(hooks_pre_forward)), METH_FASTCALL,
     "global forward pre-hook"},
    {"post_forward", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(hooks_post_forward)),
     METH_FASTCALL, "global forward hook (always called, with kwargs)"},
    {"reset", hooks_reset, METH_NOARGS, "forget open forwards"},
    {"begin_call", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(hooks_begin_call)), METH_FASTCALL,
     "pre_forward, once for this call even if torch calls pre_forward for it next"},
    {"pause", hooks_pause, METH_NOARGS, "record no forward until resume(); forget open forwards"},
    {"resume", hooks_resume, METH_NOARGS, "record forwards again"},
    {"own_thread", hooks_own_thread, METH_NOARGS, "record the calling thread's forwards from now on"},
    {"adopt", hooks_adopt, METH_O, "adopt(refs): know the module of refs[i] as index i (those alive)"},
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
  type.tp_name = "modtimeline.native._hotpath.ForwardHooks";
  type.tp_basicsize = sizeof(HooksObject);
  type.tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC;
  type.tp_doc = "ForwardHooks(store, callbacks): a Recorder's compiled forward hooks";
  type.tp_new = hooks_new;
  type.tp_dealloc = reinterpret_cast<destructor>(hooks_dealloc);
  type.tp_traverse = reinterpret_cast<traverseproc>(hooks_traverse);
  type.tp_clear = reinterpret_cast<inquiry>(hooks_clear);
  type.tp_methods = hooks_methods;
  type.tp_getset = hooks_getset;
  return type;
}();

// ---------------------------------------------------------- global hook dispatch

// What torch calls as its global forward hooks where this module is built (and torch >=
// 2.12): two functions that stay the same for the whole process (Dynamo guards on the
// hooks in torch's dictionaries) and call the hooks compile_guard.install() put in.
// compile_guard gives Dynamo Python stand-ins for them that do nothing
// (torch.compiler.substitute_in_graph), so no compiled graph holds them or breaks at them;
// run, they are one C call each instead of two Python frames (compile_guard's Python
// dispatchers serve where they cannot).
struct Dispatch {
  PyObject* pre_hooks = nullptr;         // tuple of hook(module, args)
  PyObject* post_hooks = nullptr;        // tuple of hook(module, args, output)
  PyObject* compiler = nullptr;          // torch.compiler's namespace (a dict)
  PyObject* open_boundaries = nullptr;   // compile_guard's count of open eager boundaries (a list of one int)
  PyObject* boundary_is_open = nullptr;  // callable(module): its eager boundary is open on this thread
  PyObject* dynamo_callback = nullptr;   // callable(): Dynamo's frame callback on this thread (None: off)
};
Dispatch dispatch_state;  // (read and changed with the GIL held)

// configure_dispatch(pre_hooks, post_hooks, compiler_namespace, open_boundaries, boundary_is_open,
//                    dynamo_callback)
PyObject* configure_dispatch(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 6 || !PyTuple_Check(args[0]) || !PyTuple_Check(args[1]) || !PyDict_Check(args[2]) ||
      !PyList_Check(args[3]) || PyList_GET_SIZE(args[3]) != 1 || !PyCallable_Check(args[4]) ||
      !PyCallable_Check(args[5])) {
    PyErr_SetString(PyExc_TypeError,
                    "configure_dispatch(pre_hooks: tuple, post_hooks: tuple, compiler: dict, open_boundaries: "
                    "[int], boundary_is_open, dynamo_callback)");
    return nullptr;
  }
  PyObject** fields[] = {&dispatch_state.pre_hooks,       &dispatch_state.post_hooks,
                         &dispatch_state.compiler,        &dispatch_state.open_boundaries,
                         &dispatch_state.boundary_is_open, &dispatch_state.dynamo_callback};
  // All six set before any old one is let go (letting go may run Python, which may dispatch).
  PyObject* old[6];
  for (int i = 0; i < 6; ++i) {
    old[i] = *fields[i];
    *fields[i] = Py_NewRef(args[i]);
  }
  for (PyObject* value : old) Py_XDECREF(value);
  Py_RETURN_NONE;
}

// 1: the call is not for the hooks (torch is tracing it, it runs inside a compiled
// region, or its eager boundary is open); 0: it is; -1: error.
int not_for_hooks(PyObject* module) {
  static PyObject* flag_name = PyUnicode_InternFromString("_is_compiling_flag");
  if (flag_name == nullptr) return -1;
  // (what torch.compiler.is_compiling() reads: AOT and export tracing set it)
  PyObject* compiling = PyDict_GetItemWithError(dispatch_state.compiler, flag_name);
  if (compiling == Py_True) return 1;
  if (compiling == nullptr && PyErr_Occurred()) return -1;
  // Inside a compiled function, Dynamo converts each Python frame that starts: module calls
  // it runs eagerly there (nn.Module's own call machinery, code between two graphs) call
  // their hooks in such frames, and the Python dispatchers convert to nothing (Dynamo folds
  // is_dynamo_compiling() to True). These do likewise. (None: no compiled function runs;
  // False: Dynamo only runs what it compiled before, converting nothing.)
  PyObject* callback = PyObject_CallNoArgs(dispatch_state.dynamo_callback);
  if (callback == nullptr) return -1;
  Py_DECREF(callback);  // (compared by address only)
  if (callback != Py_None && callback != Py_False) return 1;
  // (the count is a small int, and CPython has one object for 0: no call when none is open)
  static PyObject* none_open = PyLong_FromLong(0);
  PyObject* count = PyList_GET_ITEM(dispatch_state.open_boundaries, 0);
  if (count == none_open) return 0;
  int open = PyObject_IsTrue(count);
  if (open <= 0) return open;
  PyObject* is_open = PyObject_CallOneArg(dispatch_state.boundary_is_open, module);
  if (is_open == nullptr) return -1;
  int skip = PyObject_IsTrue(is_open);
  Py_DECREF(is_open);
  return skip;
}

PyObject* dispatch(PyObject* configured, PyObject* const* args, Py_ssize_t nargs) {
  if (configured == nullptr || PyTuple_GET_SIZE(configured) == 0) Py_RETURN_NONE;  // (not configured, or none)
  // Held from here: the check and the hooks may let another thread run, and an install or
  // uninstall there replaces the configured tuple.
  PyObject* hooks = Py_NewRef(configured);
  int skip = not_for_hooks(args[0]);
  for (Py_ssize_t i = 0; skip == 0 && i < PyTuple_GET_SIZE(hooks); ++i) {
    PyObject* result = PyObject_Vectorcall(PyTuple_GET_ITEM(hooks, i), args, nargs, nullptr);
    if (result == nullptr) skip = -1;
    Py_XDECREF(result);
  }
  Py_DECREF(hooks);
  if (skip < 0) return nullptr;
  Py_RETURN_NONE;
}

// dispatch_pre(module, args): torch's global forward pre-hook.
PyObject* dispatch_pre(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2) {
    PyErr_SetString(PyExc_TypeError, "dispatch_pre(module, args)");
    return nullptr;
  }
  return dispatch(dispatch_state.pre_hooks, args, nargs);
}

// dispatch_post(module, args, output): torch's global forward hook (always called).
PyObject* dispatch_post(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 3) {
    PyErr_SetString(PyExc_TypeError, "dispatch_post(module, args, output)");
    return nullptr;
  }
  return dispatch(dispatch_state.post_hooks, args, nargs);
}

// ------------------------------------------------------------------ module calls

// What nn.Module._call_impl runs while a recorder's hooks are on (compile_guard puts in a
// Python function that calls module_call): the module's forward between those hooks, as
// torch's _call_impl runs them, without its slow path. Once torch's global hook
// dictionaries hold anything, every module call takes that path (a closure, an import, a
// set, the dictionaries' items copied, each hook key looked up in four more dictionaries:
// ~2 µs a call on this project's CPU machines, the "floor" of issue 26). Here: a few
// reads. Only where the outcome is the same as torch's: our hooks are the only ones in
// torch's dictionaries, the module has none of its own, torch is not tracing (jit,
// export, Dynamo); anything else goes to torch's own _call_impl, unchanged.
struct ModuleCall {
  bool on = false;               // our hooks are in torch's dictionaries, called by the dispatchers above
  PyObject* torch_call = nullptr;     // torch's own Module._call_impl
  PyObject* forward_pre = nullptr;    // torch's _global_forward_pre_hooks
  PyObject* forward_post = nullptr;   // torch's _global_forward_hooks
  PyObject* backward_pre = nullptr;   // torch's _global_backward_pre_hooks
  PyObject* backward_post = nullptr;  // torch's _global_backward_hooks
  PyObject* tracing_state = nullptr;  // torch._C._get_tracing_state
};
ModuleCall call_state;  // (read and changed with the GIL held)

// configure_module_call(on, torch_call, forward_pre, forward_post, backward_pre, backward_post, tracing_state)
PyObject* configure_module_call(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 7 || !PyBool_Check(args[0]) || !PyCallable_Check(args[1]) || !PyDict_Check(args[2]) ||
      !PyDict_Check(args[3]) || !PyDict_Check(args[4]) || !PyDict_Check(args[5]) || !PyCallable_Check(args[6])) {
    PyErr_SetString(PyExc_TypeError,
                    "configure_module_call(on: bool, torch_call, forward_pre: dict, forward_post: dict, "
                    "backward_pre: dict, backward_post: dict, tracing_state)");
    return nullptr;
  }
  PyObject** fields[] = {&call_state.torch_call,   &call_state.forward_pre,   &call_state.forward_post,
                         &call_state.backward_pre, &call_state.backward_post, &call_state.tracing_state};
  PyObject* old[6];
  for (int i = 0; i < 6; ++i) {
    old[i] = *fields[i];
    *fields[i] = Py_NewRef(args[i + 1]);
  }
  call_state.on = args[0] == Py_True;
  for (PyObject* value : old) Py_XDECREF(value);
  Py_RETURN_NONE;
}

// torch's own Module._call_impl(module, *args, **kwargs).
PyObject* torch_module_call(PyObject* module, PyObject* args, PyObject* kwargs) {
  if (call_state.torch_call == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "module_call: configure_module_call() was never called");
    return nullptr;
  }
  Py_ssize_t size = PyTuple_GET_SIZE(args);
  std::vector<PyObject*> stack(static_cast<size_t>(size) + 1);
  stack[0] = module;
  for (Py_ssize_t i = 0; i < size; ++i) stack[i + 1] = PyTuple_GET_ITEM(args, i);
  return PyObject_VectorcallDict(call_state.torch_call, stack.data(), stack.size(), kwargs);
}

// 1: the module's own hook dictionary `name` is empty; 0: it is not (or the module lacks
// it: torch's path says so); -1: error.
int hooks_are_empty(PyObject* module, PyObject* name) {
  PyObject* value = PyObject_GetAttr(module, name);
  if (value == nullptr) {
    if (!PyErr_ExceptionMatches(PyExc_AttributeError)) return -1;
    PyErr_Clear();
    return 0;
  }
  int empty = PyDict_Check(value) && PyDict_GET_SIZE(value) == 0;
  Py_DECREF(value);
  return empty;
}

// 1: the call can skip torch's hook machinery with the same outcome; 0: it cannot; -1: error.
int fast_call_applies(PyObject* module) {
  if (!call_state.on || dispatch_state.pre_hooks == nullptr || dispatch_state.post_hooks == nullptr) return 0;
  // (ours: one pre-hook and one always-called post-hook without kwargs; anybody else's, or
  // a tracker's post-hook with kwargs, makes more)
  if (PyDict_GET_SIZE(call_state.forward_pre) != 1 || PyDict_GET_SIZE(call_state.forward_post) != 1 ||
      PyDict_GET_SIZE(call_state.backward_pre) != 0 || PyDict_GET_SIZE(call_state.backward_post) != 0 ||
      PyTuple_GET_SIZE(dispatch_state.pre_hooks) == 0 || PyTuple_GET_SIZE(dispatch_state.post_hooks) == 0) {
    return 0;
  }
  static PyObject* names[] = {
      PyUnicode_InternFromString("_forward_pre_hooks"), PyUnicode_InternFromString("_forward_hooks"),
      PyUnicode_InternFromString("_backward_pre_hooks"), PyUnicode_InternFromString("_backward_hooks"),
  };
  for (PyObject* name : names) {
    if (name == nullptr) return -1;
    int empty = hooks_are_empty(module, name);
    if (empty <= 0) return empty;
  }
  PyObject* tracing = PyObject_CallNoArgs(call_state.tracing_state);  // (torch.jit.trace: _slow_forward)
  if (tracing == nullptr) return -1;
  Py_DECREF(tracing);  // (compared by address only)
  if (tracing != Py_None) return 0;
  int skip = not_for_hooks(module);
  return skip < 0 ? -1 : !skip;
}

// Call each of `hooks` (a tuple) with `args`; a hook's result other than None replaces
// *result when `result` is given (torch's forward hooks may replace the output). False:
// one raised.
bool call_hooks(PyObject* hooks, PyObject* const* args, Py_ssize_t nargs, PyObject** result) {
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(hooks); ++i) {
    PyObject* returned = PyObject_Vectorcall(PyTuple_GET_ITEM(hooks, i), args, nargs, nullptr);
    if (returned == nullptr) return false;
    if (result != nullptr && returned != Py_None) {
      Py_SETREF(*result, returned);
    } else {
      Py_DECREF(returned);
    }
  }
  return true;
}

// A forward raised an Exception (the error is set): torch calls each always-called hook
// with (module, args, None) while it handles the error, warns of a hook that raised too,
// and raises the forward's error. (Not for a BaseException: KeyboardInterrupt skips them.)
void after_raise(PyObject* hooks, PyObject* module, PyObject* args) {
  if (!PyErr_ExceptionMatches(PyExc_Exception)) return;
  PyObject *type, *value, *traceback;
  PyErr_Fetch(&type, &value, &traceback);
  PyErr_NormalizeException(&type, &value, &traceback);
  if (traceback != nullptr) PyException_SetTraceback(value, traceback);
  PyObject *was_type, *was_value, *was_traceback;  // (what sys.exc_info() gave before)
  PyErr_GetExcInfo(&was_type, &was_value, &was_traceback);
  PyErr_SetExcInfo(Py_NewRef(type), Py_NewRef(value), Py_XNewRef(traceback));  // (the hooks see it)
  PyObject* call_args[] = {module, args, Py_None};
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(hooks); ++i) {
    PyObject* returned = PyObject_Vectorcall(PyTuple_GET_ITEM(hooks, i), call_args, 3, nullptr);
    if (returned != nullptr) {
      Py_DECREF(returned);
      continue;
    }
    PyObject *hook_type, *hook_error, *hook_traceback;
    PyErr_Fetch(&hook_type, &hook_error, &hook_traceback);
    if (PyErr_WarnFormat(PyExc_UserWarning, 1,
                         "global module forward hook with ``always_call=True`` raised an exception that was "
                         "silenced as another error was raised in forward: %S",
                         hook_error != nullptr ? hook_error : Py_None) < 0) {
      PyErr_Clear();
    }
    Py_XDECREF(hook_type);
    Py_XDECREF(hook_error);
    Py_XDECREF(hook_traceback);
  }
  PyErr_SetExcInfo(was_type, was_value, was_traceback);
  PyErr_Restore(type, value, traceback);
}

// module_call(module, args, kwargs): nn.Module._call_impl(module, *args, **kwargs).
PyObject* module_call(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 3 || !PyTuple_Check(args[1]) || !PyDict_Check(args[2])) {
    PyErr_SetString(PyExc_TypeError, "module_call(module, args: tuple, kwargs: dict)");
    return nullptr;
  }
  PyObject* module = args[0];
  int fast = fast_call_applies(module);
  if (fast < 0) return nullptr;
  if (fast == 0) return torch_module_call(module, args[1], args[2]);
  // Held from here: a hook may let another thread run, and an uninstall there replaces them.
  PyObject* pre_hooks = Py_NewRef(dispatch_state.pre_hooks);
  PyObject* post_hooks = Py_NewRef(dispatch_state.post_hooks);
  PyObject* result = nullptr;
  PyObject* call_args[] = {module, args[1], nullptr};
  // (our pre-hooks return None: torch would take another value as the new args)
  if (call_hooks(pre_hooks, call_args, 2, nullptr)) {
    static PyObject* forward_name = PyUnicode_InternFromString("forward");
    PyObject* forward = forward_name == nullptr ? nullptr : PyObject_GetAttr(module, forward_name);
    if (forward != nullptr) {
      result = PyObject_Call(forward, args[1], PyDict_GET_SIZE(args[2]) ? args[2] : nullptr);
      Py_DECREF(forward);
    }
  }
  if (result == nullptr) {  // (a pre-hook or the forward raised: torch calls the post-hooks so too)
    after_raise(post_hooks, module, args[1]);
  } else {
    call_args[2] = result;
    if (!call_hooks(post_hooks, call_args, 3, &result)) Py_CLEAR(result);
  }
  Py_DECREF(pre_hooks);
  Py_DECREF(post_hooks);
  return result;
}

PyMethodDef hotpath_functions[] = {
    {"configure_dispatch", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(configure_dispatch)),
     METH_FASTCALL,
     "configure_dispatch(pre_hooks, post_hooks, compiler_namespace, open_boundaries, boundary_is_open, "
     "dynamo_callback)"},
    {"dispatch_pre", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(dispatch_pre)), METH_FASTCALL,
     "dispatch_pre(module, args): call every pre-hook configured"},
    {"dispatch_post", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(dispatch_post)), METH_FASTCALL,
     "dispatch_post(module, args, output): call every post-hook configured"},
    {"configure_module_call", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(configure_module_call)),
     METH_FASTCALL,
     "configure_module_call(on, torch_call, forward_pre, forward_post, backward_pre, backward_post, tracing_state)"},
    {"module_call", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(module_call)), METH_FASTCALL,
     "module_call(module, args, kwargs): nn.Module._call_impl(module, *args, **kwargs)"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef hotpath_module = {
    PyModuleDef_HEAD_INIT, "modtimeline.native._hotpath", "modtimeline's compiled recording hot path", -1,
    hotpath_functions,     nullptr,                nullptr,                                     nullptr,
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
  int added = add_layout(module, HOTPATH_API);
  if (added < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
