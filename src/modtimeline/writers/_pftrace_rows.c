/* Perfetto TrackEvent packets for span columns, encoded straight from the columns.
 *
 * The optional compiled half of writers/pftrace_rows.py, which holds the same encoding in
 * Python and says what every byte is: per track, a nesting walk turns spans into
 * SLICE_BEGIN/SLICE_END events; the tracks' events are merged by time (ties: the track
 * listed first); each event becomes one length-delimited TracePacket (field 1 of Trace)
 * with an incremental timestamp on its track's packet sequence. Both halves write the
 * same bytes (a test compares them).
 */
#include "_columns.h"

/* Bumped when encode_spans's arguments or output change: pftrace_rows.py refuses a
 * stale build. */
#define API_VERSION 3

enum { ARG_STEP = 1, ARG_CALL = 2, ARG_INCOMPLETE = 3, ARG_LAG = 4, ARG_APPROXIMATE = 5, ARG_COMPILED = 6, ARG_FUSED = 7 }; /* interned */
enum { SEQ_NEEDS_INCREMENTAL_STATE = 2, TYPE_SLICE_BEGIN = 1, TYPE_SLICE_END = 2 };

static size_t put_varint(uint8_t *at, uint64_t value) {
    size_t n = 0;
    while (value >= 0x80) {
        at[n++] = (uint8_t)(value | 0x80);
        value >>= 7;
    }
    at[n++] = (uint8_t)value;
    return n;
}

static size_t varint_size(uint64_t value) {
    size_t n = 1;
    while (value >= 0x80) {
        value >>= 7;
        n++;
    }
    return n;
}

/* One debug annotation {name_iid, int_value} into `at`; returns bytes written. */
static size_t put_int_arg(uint8_t *at, int name, int64_t value) {
    size_t body = 2 + 1 + varint_size((uint64_t)value);
    size_t n = 0;
    at[n++] = 0x22; /* TrackEvent.debug_annotations (4), length-delimited */
    n += put_varint(at + n, body);
    at[n++] = 0x08; /* DebugAnnotation.name_iid (1) */
    at[n++] = (uint8_t)name;
    at[n++] = 0x20; /* int_value (4) */
    n += put_varint(at + n, (uint64_t)value);
    return n;
}

static size_t put_bool_arg(uint8_t *at, int name) {
    /* 0x22 len=4 { name_iid, bool_value (2) = 1 } */
    at[0] = 0x22;
    at[1] = 4;
    at[2] = 0x08;
    at[3] = (uint8_t)name;
    at[4] = 0x10;
    at[5] = 1;
    return 6;
}

static size_t put_double_arg(uint8_t *at, int name, double value) {
    /* 0x22 len=11 { name_iid, double_value (5, fixed64) } */
    at[0] = 0x22;
    at[1] = 11;
    at[2] = 0x08;
    at[3] = (uint8_t)name;
    at[4] = 0x29;
    memcpy(at + 5, &value, 8); /* little-endian machines only (x86-64, arm64) */
    return 13;
}

static size_t put_fixed64_field(uint8_t *at, unsigned field, uint64_t value) {
    size_t n = put_varint(at, ((uint64_t)field << 3) | 1);
    memcpy(at + n, &value, 8);
    return n + 8;
}

typedef struct {
    const int64_t *begin, *end, *name, *call, *step, *lag;
    const int8_t *category, *flags, *flow;
    int64_t base, flow_base;
} Columns;

/* The TrackEvent of one event into `event`; returns its length. */
static size_t encode_track_event(uint8_t *event, const Columns *c, int64_t row, int begins) {
    size_t n = 0;
    if (!begins) {
        event[n++] = 0x48; /* type (9) */
        event[n++] = TYPE_SLICE_END;
        return n;
    }
    event[n++] = 0x18; /* category_iids (3) */
    n += put_varint(event + n, (uint64_t)(c->category[row] + 1));
    n += put_int_arg(event + n, ARG_STEP, c->step[row]);
    n += put_int_arg(event + n, ARG_CALL, c->call[row]);
    if (c->flags[row] & INCOMPLETE) n += put_bool_arg(event + n, ARG_INCOMPLETE);
    if (c->flags[row] & APPROXIMATE) n += put_bool_arg(event + n, ARG_APPROXIMATE);
    if (c->flags[row] & COMPILED) n += put_bool_arg(event + n, ARG_COMPILED);
    if (c->flags[row] & FUSED) n += put_bool_arg(event + n, ARG_FUSED);
    if (c->lag[row] != INT64_MIN) n += put_double_arg(event + n, ARG_LAG, (double)c->lag[row] / 1000.0);
    event[n++] = 0x48;
    event[n++] = TYPE_SLICE_BEGIN;
    event[n++] = 0x50; /* name_iid (10) */
    n += put_varint(event + n, (uint64_t)(c->name[row] + 1));
    if (c->flow[row] == FLOW_OUT) n += put_fixed64_field(event + n, 47, (uint64_t)(c->flow_base + c->call[row] + 1));
    if (c->flow[row] == FLOW_IN) n += put_fixed64_field(event + n, 48, (uint64_t)(c->flow_base + c->call[row] + 1));
    return n;
}

/* One packet: Trace.packet (1) { timestamp (8), trusted_packet_sequence_id (10),
 * track_event (11), sequence_flags (13) }. */
static int put_packet(Output *out, uint64_t delta, uint64_t sequence, const uint8_t *event, size_t event_size) {
    size_t body = 1 + varint_size(delta) + 1 + varint_size(sequence) + 1 + varint_size(event_size) + event_size + 2;
    if (output_reserve(out, body + 11) < 0) return -1;
    uint8_t *at = (uint8_t *)out->data + out->size;
    size_t n = 0;
    at[n++] = 0x0A;
    n += put_varint(at + n, body);
    at[n++] = 0x40;
    n += put_varint(at + n, delta);
    at[n++] = 0x50;
    n += put_varint(at + n, sequence);
    at[n++] = 0x5A;
    n += put_varint(at + n, event_size);
    memcpy(at + n, event, event_size);
    n += event_size;
    at[n++] = 0x68;
    at[n++] = SEQ_NEEDS_INCREMENTAL_STATE;
    out->size += n;
    return 0;
}

/* A track's walk, resumable: its state lives in a caller's array('q') of
 * [next position to begin, depth, last timestamp written (relative to base), stack...];
 * the stack holds what the array has room for (pftrace_rows.py grows it). */
enum { STATE_NEXT, STATE_DEPTH, STATE_PREVIOUS, STATE_STACK };

typedef struct {
    Py_ssize_t next, stop; /* next position to begin; the end of the run */
    int64_t *stack;        /* open rows (in the state array) */
    Py_ssize_t depth, capacity;
    uint64_t sequence;
    int64_t previous; /* last timestamp written on this sequence, relative to base */
    int64_t *state;
    Py_buffer state_view;
} Track;

/* The row at position `at` of a run: order[at], or `at` itself without an order. */
static inline int64_t row_at(const int64_t *order, Py_ssize_t at) { return order ? order[at] : (int64_t)at; }

/* The track's next event: (time, row, begins); 0 when it has none left. */
static int peek(const Track *t, const Columns *c, const int64_t *order, int64_t *time, int64_t *row, int *begins) {
    if (t->next < t->stop) {
        int64_t candidate = row_at(order, t->next);
        int64_t start = c->begin[candidate];
        if (t->depth && c->end[t->stack[t->depth - 1]] <= start) {
            *row = t->stack[t->depth - 1];
            *time = c->end[*row];
            *begins = 0;
            return 1;
        }
        *row = candidate;
        *time = start;
        *begins = 1;
        return 1;
    }
    if (t->depth) {
        *row = t->stack[t->depth - 1];
        *time = c->end[*row];
        *begins = 0;
        return 1;
    }
    return 0;
}

static PyObject *encode_spans(PyObject *module, PyObject *args) {
    PyObject *objects[9], *order_o, *runs_o, *sequences, *states;
    long long base, flow_base;
    Py_ssize_t max_bytes;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOOOOLLn", &objects[0], &objects[1], &objects[2], &objects[3], &objects[4],
                          &objects[5], &objects[6], &objects[7], &objects[8], &order_o, &runs_o, &sequences, &states,
                          &base, &flow_base, &max_bytes))
        return NULL;
    Py_ssize_t rows = PyObject_Length(objects[0]);
    if (rows < 0) return NULL;
    const char *formats[9] = {"q", "q", "q", "b", "q", "q", "b", "b", "q"};
    const char *names[9] = {"begin", "end", "name", "category", "call", "step", "flags", "flow", "lag"};
    Py_buffer v[9], order_view = {0}, runs_view = {0};
    int got = 0, have_order = 0, have_runs = 0;
    PyObject *result = NULL;
    Track *tracks = NULL;
    Py_ssize_t track_count = 0, tracks_ready = 0;
    Output out = {0};
    for (; got < 9; got++)
        if (get_column(objects[got], &v[got], formats[got], rows, names[got]) < 0) goto done;
    Columns c = {v[0].buf, v[1].buf, v[2].buf, v[4].buf, v[5].buf, v[8].buf, v[3].buf, v[6].buf, v[7].buf, base,
                 flow_base};
    const int64_t *order = NULL;
    Py_ssize_t positions = rows; /* positions a run may span */
    if (order_o != Py_None) {
        if (get_column(order_o, &order_view, "q", -1, "order") < 0) goto done;
        have_order = 1;
        order = order_view.buf;
        positions = order_view.len / (Py_ssize_t)sizeof(int64_t);
        for (Py_ssize_t i = 0; i < positions; i++)
            if (order[i] < 0 || order[i] >= rows) {
                PyErr_SetString(PyExc_ValueError, "order holds a row that is not a row of the columns");
                goto done;
            }
    }
    if (get_column(runs_o, &runs_view, "q", -1, "runs") < 0) goto done;
    have_runs = 1;
    const int64_t *runs = runs_view.buf;
    track_count = runs_view.len / (Py_ssize_t)(2 * sizeof(int64_t));
    if (PySequence_Length(sequences) != track_count || PySequence_Length(states) != track_count) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "one sequence id and one state per run");
        goto done;
    }
    tracks = PyMem_Calloc((size_t)(track_count ? track_count : 1), sizeof(Track));
    if (tracks == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (; tracks_ready < track_count; tracks_ready++) {
        Track *t = &tracks[tracks_ready];
        PyObject *sequence = PySequence_GetItem(sequences, tracks_ready);
        t->sequence = sequence ? PyLong_AsUnsignedLongLong(sequence) : 0;
        Py_XDECREF(sequence);
        PyObject *state = PySequence_GetItem(states, tracks_ready);
        int no_state = state == NULL || PyErr_Occurred() ||
                       PyObject_GetBuffer(state, &t->state_view, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0;
        Py_XDECREF(state);
        if (no_state) goto done;
        Py_ssize_t length = t->state_view.len / (Py_ssize_t)sizeof(int64_t);
        if (t->state_view.format == NULL || strcmp(t->state_view.format, "q") != 0 || length < STATE_STACK) {
            PyBuffer_Release(&t->state_view);
            PyErr_SetString(PyExc_ValueError, "a run's state is an array('q') of 3 + room for its stack");
            goto done;
        }
        t->state = t->state_view.buf;
        t->next = (Py_ssize_t)t->state[STATE_NEXT];
        t->stop = (Py_ssize_t)runs[2 * tracks_ready + 1];
        t->depth = (Py_ssize_t)t->state[STATE_DEPTH];
        t->capacity = length - STATE_STACK;
        t->previous = t->state[STATE_PREVIOUS];
        t->stack = t->state + STATE_STACK;
        Py_ssize_t start = (Py_ssize_t)runs[2 * tracks_ready];
        int bad = start < 0 || t->stop < start || t->stop > positions || t->next < start || t->next > t->stop ||
                  t->depth < 0 || t->depth > t->capacity || t->depth > t->next - start;
        for (Py_ssize_t i = 0; i < t->depth && !bad; i++) bad = t->stack[i] < 0 || t->stack[i] >= rows;
        if (bad) {
            PyBuffer_Release(&t->state_view);
            PyErr_SetString(PyExc_ValueError, "a run or its state does not fit the columns");
            goto done;
        }
    }

    uint8_t event[256];
    for (;;) {
        /* the earliest next event of all tracks; ties go to the track listed first */
        Py_ssize_t best = -1;
        int64_t best_time = 0, best_row = 0;
        int best_begins = 0;
        for (Py_ssize_t k = 0; k < track_count; k++) {
            int64_t time, row;
            int begins;
            if (peek(&tracks[k], &c, order, &time, &row, &begins) && (best < 0 || time < best_time)) {
                best = k;
                best_time = time;
                best_row = row;
                best_begins = begins;
            }
        }
        if (best < 0) break;
        Track *t = &tracks[best];
        if (best_begins) {
            if (t->depth == t->capacity) break; /* the stack is full: the caller grows it */
            t->stack[t->depth++] = best_row;
            t->next++;
        } else {
            t->depth--;
        }
        int64_t relative = best_time - base;
        size_t size = encode_track_event(event, &c, best_row, best_begins);
        if (put_packet(&out, (uint64_t)(relative - t->previous), t->sequence, event, size) < 0) goto done;
        t->previous = relative;
        if ((Py_ssize_t)out.size >= max_bytes) break; /* the rest in the next call */
    }
    result = PyBytes_FromStringAndSize(out.data ? out.data : "", (Py_ssize_t)out.size);

done:
    PyMem_Free(out.data);
    for (Py_ssize_t k = 0; k < tracks_ready; k++) {
        Track *t = &tracks[k];
        t->state[STATE_NEXT] = t->next;
        t->state[STATE_DEPTH] = t->depth;
        t->state[STATE_PREVIOUS] = t->previous;
        PyBuffer_Release(&t->state_view);
    }
    PyMem_Free(tracks);
    if (have_order) PyBuffer_Release(&order_view);
    if (have_runs) PyBuffer_Release(&runs_view);
    for (int k = 0; k < got; k++) PyBuffer_Release(&v[k]);
    return result;
}

/* track_runs(track): [(tid, start, stop)] sorted by tid when each track's rows are one
 * run of consecutive rows, else None (pftrace_rows.track_runs). */
static PyObject *track_runs(PyObject *module, PyObject *track_o) {
    Py_buffer view;
    if (get_column(track_o, &view, "q", -1, "track") < 0) return NULL;
    const int64_t *track = view.buf;
    Py_ssize_t rows = view.len / (Py_ssize_t)sizeof(int64_t);
    PyObject *found = PyList_New(0);
    PyObject *seen = PySet_New(NULL);
    if (found == NULL || seen == NULL) goto fail;
    for (Py_ssize_t start = 0, stop; start < rows; start = stop) {
        for (stop = start + 1; stop < rows && track[stop] == track[start]; stop++) {
        }
        PyObject *tid = PyLong_FromLongLong(track[start]);
        if (tid == NULL) goto fail;
        int repeated = PySet_Contains(seen, tid);
        if (repeated != 0 || PySet_Add(seen, tid) < 0) {
            Py_DECREF(tid);
            if (repeated < 0 || PyErr_Occurred()) goto fail;
            Py_DECREF(found);
            Py_DECREF(seen);
            PyBuffer_Release(&view);
            Py_RETURN_NONE;
        }
        PyObject *run = Py_BuildValue("(Nnn)", tid, start, stop);
        if (run == NULL || PyList_Append(found, run) < 0) {
            Py_XDECREF(run);
            goto fail;
        }
        Py_DECREF(run);
    }
    Py_DECREF(seen);
    PyBuffer_Release(&view);
    if (PyList_Sort(found) < 0) {
        Py_DECREF(found);
        return NULL;
    }
    return found;

fail:
    Py_XDECREF(found);
    Py_XDECREF(seen);
    PyBuffer_Release(&view);
    return NULL;
}

static PyMethodDef methods[] = {
    {"encode_spans", encode_spans, METH_VARARGS,
     "encode_spans(begin, end, name, category, call, step, flags, flow, lag, order, runs, sequences, states, base,"
     " flow_base, max_bytes) -> bytes\n\nThe next SLICE_BEGIN/SLICE_END TracePackets of the spans, merged by time,"
     " until about max_bytes or a full stack (see pftrace_rows.py); b'' when all are written."},
    {"track_runs", track_runs, METH_O,
     "track_runs(track) -> [(tid, start, stop)] sorted, or None when a track's rows are not one run"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef definition = {PyModuleDef_HEAD_INIT, "_pftrace_rows", NULL, -1, methods};

PyMODINIT_FUNC PyInit__pftrace_rows(void) { return module_with_api(&definition, API_VERSION); }
