/* What both compiled writers (_chrome_rows.c, _pftrace_rows.c) need: a growing output
 * buffer, a span column read through the buffer protocol, and their module made with
 * the API version their Python half checks. */
#ifndef MODTIMELINE_WRITERS_COLUMNS_H
#define MODTIMELINE_WRITERS_COLUMNS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "../native/_layout.h" /* every constant shared with Python */
#include <stdint.h>
#include <string.h>

typedef struct {
    char *data;
    size_t size;
    size_t capacity;
} Output;

/* Room for `more` bytes after `size`; -1 (MemoryError set) when there is none. */
static int output_reserve(Output *out, size_t more) {
    if (out->size + more <= out->capacity) return 0;
    size_t capacity = out->capacity ? out->capacity : 1 << 16;
    while (capacity < out->size + more) capacity *= 2;
    char *data = PyMem_Realloc(out->data, capacity);
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    out->data = data;
    out->capacity = capacity;
    return 0;
}

/* A column (an array of `format`, `rows` items; rows < 0: any number) as a buffer view. */
static int get_column(PyObject *object, Py_buffer *view, const char *format, Py_ssize_t rows, const char *name) {
    if (PyObject_GetBuffer(object, view, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) return -1;
    if (view->format == NULL || strcmp(view->format, format) != 0 || (rows >= 0 && view->len / view->itemsize != rows)) {
        PyErr_Format(PyExc_TypeError, "column %s: expected %zd items of array format '%s'", name, rows, format);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* The module of `definition`, with its `API` constant (the arguments its functions take:
 * the Python half refuses another). */
/* The module, with LAYOUT: every constant shared with Python and its API version (the
 * handshake of every compiled part, native/_layout.h). */
static PyObject *module_with_api(PyModuleDef *definition, int api) {
    PyObject *module = PyModule_Create(definition);
    if (module && add_layout(module, api) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}

#endif
