/* The common case of a call, in C: one request and one "200 OK" answer on a plain socket;
 * and the common case of a callback: a long poll and the batch of notifications answering it.
 *
 * goplug/wire/http.py is the protocol; this file only recognises the exact messages goplug
 * peers send (a POST with Host and Content-Length, a 200 OK with Content-Length; a long poll
 * and a batch with their X-Goplug headers, in the order goplug writes them) and hands
 * everything else back to the Python parser untouched, so it never has to understand more of
 * HTTP than that. What it saves is the Python work around each system call: on a 64-byte call
 * that work costs more than the round trip through the kernel.
 *
 * The functions that touch a socket release the GIL around every system call. Timeouts are the
 * socket's own (SO_RCVTIMEO/SO_SNDTIMEO, set by goplug.transport.set_timeouts): an expired one
 * surfaces as EAGAIN, which becomes BlockingIOError exactly as it would from socket.recv.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <time.h>

#define RECV_SIZE 65536
/* Bodies this large make the allocator worth tuning (goplug.memory). */
#define LARGE_BODY (256 * 1024)

/* Result codes of serve(); goplug/_fastpath.pyi names them. */
enum { SERVE_EOF = 0, SERVE_IDLE = 1, SERVE_DATA = 2, SERVE_RAISED = 3, SERVE_RESULT = 4,
       SERVE_SLOW = 5 };

static const char OK_PREFIX[] = "HTTP/1.1 200 OK\r\nContent-Length: ";
#define OK_PREFIX_LEN (sizeof(OK_PREFIX) - 1)
/* A long poll's answer (docs/PROTOCOL.md §5): numbered notifications in one body. */
static const char BATCH_PREFIX[] = "HTTP/1.1 200 OK\r\nX-Goplug-Seq: ";
static const char COUNT_PREFIX[] = "\r\nX-Goplug-Count: ";
static const char POST_PREFIX[] = "POST /";
static const char HTTP11_HOST[] = " HTTP/1.1\r\nHost: ";
static const char LENGTH_PREFIX[] = "\r\nContent-Length: ";
static const char SUBSCRIBER_PREFIX[] = "\r\nX-Goplug-Subscriber: ";
static const char ACK_PREFIX[] = "\r\nX-Goplug-Ack: ";

static double
monotonic(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Digits then CRLFCRLF in [p, end): the length, with *after set past the blank line; or -1. */
static Py_ssize_t
parse_length(const char *p, const char *end, const char **after)
{
    const char *start = p;
    Py_ssize_t n = 0;
    while (p < end && *p >= '0' && *p <= '9') {
        if (p - start >= 18)
            return -1;
        n = n * 10 + (*p - '0');
        p++;
    }
    if (p == start || end - p < 4 || memcmp(p, "\r\n\r\n", 4) != 0)
        return -1;
    *after = p + 4;
    return n;
}

/* A plain "200 OK" head with a Content-Length at buf: the body length, with *after set at the
 * body; or -1. */
static Py_ssize_t
parse_ok(const char *buf, Py_ssize_t len, const char **after)
{
    if ((size_t)len < OK_PREFIX_LEN || memcmp(buf, OK_PREFIX, OK_PREFIX_LEN) != 0)
        return -1;
    return parse_length(buf + OK_PREFIX_LEN, buf + len, after);
}

/* Decimal digits at *p (at most 18) followed by the literal lit: the number, with *p moved past
 * lit; or -1. */
static long long
parse_field(const char **p, const char *end, const char *lit, size_t lit_len)
{
    const char *q = *p;
    long long n = 0;
    while (q < end && *q >= '0' && *q <= '9') {
        if (q - *p >= 18)
            return -1;
        n = n * 10 + (*q - '0');
        q++;
    }
    if (q == *p || (size_t)(end - q) < lit_len || memcmp(q, lit, lit_len) != 0)
        return -1;
    *p = q + lit_len;
    return n;
}

/* A poll answer's head as goplug plugins send it: the body length, with the first sequence
 * number and the count of notifications, and *after set at the body; or -1. */
static Py_ssize_t
parse_batch_head(const char *buf, Py_ssize_t len, long long *seq, long long *count,
                 const char **after)
{
    const char *p = buf + sizeof(BATCH_PREFIX) - 1, *end = buf + len;
    if ((size_t)len < sizeof(BATCH_PREFIX) - 1
        || memcmp(buf, BATCH_PREFIX, sizeof(BATCH_PREFIX) - 1) != 0)
        return -1;
    if ((*seq = parse_field(&p, end, COUNT_PREFIX, sizeof(COUNT_PREFIX) - 1)) < 0)
        return -1;
    if ((*count = parse_field(&p, end, LENGTH_PREFIX, sizeof(LENGTH_PREFIX) - 1)) < 0)
        return -1;
    return parse_length(p, end, after);
}

/* The (bytes, size) arguments of ok_body() and request_of(); 0, or -1 with an exception set. */
static int
bytes_and_size(PyObject *const *args, Py_ssize_t nargs, const char *name, const char **buf,
               Py_ssize_t *len, Py_ssize_t *size)
{
    if (nargs != 2 || !PyBytes_Check(args[0])) {
        PyErr_Format(PyExc_TypeError, "%s() takes bytes and a size", name);
        return -1;
    }
    *size = PyLong_AsSsize_t(args[1]);
    if (*size == -1 && PyErr_Occurred())
        return -1;
    *buf = PyBytes_AS_STRING(args[0]);
    *len = PyBytes_GET_SIZE(args[0]);
    return 0;
}

/* Send every byte of iov (none if iovcnt is 0), then receive once into buf, both in one stretch
 * without the GIL (each release and re-acquire costs about as much as a system call).
 * Returns the bytes received (0: the peer closed), or -1 with *err set to errno, or to 0 when
 * a signal handler raised (the exception is set). EINTR is retried where it happened. */
static Py_ssize_t
send_recv(int fd, struct iovec *iov, int iovcnt, char *buf, size_t len, int *err)
{
    for (;;) {
        ssize_t got = 0;
        int saved = 0;
        Py_BEGIN_ALLOW_THREADS
        while (iovcnt > 0) {
            struct msghdr mh;
            ssize_t sent;
            memset(&mh, 0, sizeof(mh));
            mh.msg_iov = iov;
            mh.msg_iovlen = (size_t)iovcnt;
            sent = sendmsg(fd, &mh, MSG_NOSIGNAL);
            if (sent < 0) {
                saved = errno;
                break;
            }
            while (iovcnt > 0 && (size_t)sent >= iov->iov_len) {
                sent -= (ssize_t)iov->iov_len;
                iov++;
                iovcnt--;
            }
            if (iovcnt > 0) {
                iov->iov_base = (char *)iov->iov_base + sent;
                iov->iov_len -= (size_t)sent;
            }
        }
        if (saved == 0) {
            got = recv(fd, buf, len, 0);
            if (got < 0)
                saved = errno;
        }
        Py_END_ALLOW_THREADS
        if (saved == 0)
            return got;
        if (saved == EINTR) {
            if (PyErr_CheckSignals() < 0) {
                *err = 0;
                return -1;
            }
            continue;
        }
        *err = saved;
        return -1;
    }
}

/* An OSError (of the subclass errno maps to) unless err is 0: then one is set already. */
static void
raise_errno(int err)
{
    if (err) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
    }
}

static void
set_recv_timeout(int fd, double seconds)
{
    struct timeval tv;
    if (seconds < 0.001)
        seconds = 0.001;
    tv.tv_sec = (time_t)seconds;
    tv.tv_usec = (suseconds_t)((seconds - (double)tv.tv_sec) * 1e6);
    (void)setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
}

static void
clear_recv_timeout(int fd)
{
    struct timeval tv = {0, 0};
    (void)setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
}

/* Receive into dst until *have reaches n, without the GIL throughout (a large body takes
 * several receives; re-acquiring the GIL between them only costs). Each recv is bounded by SO_RCVTIMEO, the whole by
 * deadline (when timeout > 0; with shrink, SO_RCVTIMEO is cut to what is left of it once it is
 * shorter). Returns 1 when complete, 0 when the peer closed first, -1 with *err set to errno,
 * ETIMEDOUT past the deadline, or 0 when a signal handler raised (the exception is set). */
static int
recv_rest(int fd, char *dst, Py_ssize_t *have, Py_ssize_t n, double deadline, double timeout,
          int shrink, int *err)
{
    for (;;) {
        int status = 1, saved = 0;
        Py_ssize_t done = *have;
        Py_BEGIN_ALLOW_THREADS
        while (done < n) {
            ssize_t got = recv(fd, dst + done, (size_t)(n - done), 0);
            if (got <= 0) {
                saved = got < 0 ? errno : 0;
                status = got < 0 ? -1 : 0;
                break;
            }
            done += got;
            if (done < n && timeout > 0) {
                double remaining = deadline - monotonic();
                if (remaining <= 0) {
                    saved = ETIMEDOUT;
                    status = -1;
                    break;
                }
                if (shrink && remaining < timeout - 0.05) {
                    set_recv_timeout(fd, remaining);
                    shrink = 0;
                }
            }
        }
        Py_END_ALLOW_THREADS
        *have = done;
        if (status == -1 && saved == EINTR) {
            if (PyErr_CheckSignals() < 0) {
                *err = 0;
                return -1;
            }
            continue;
        }
        *err = saved;
        return status;
    }
}

static int
call_tuner(PyObject *tune)
{
    PyObject *r;
    if (tune == Py_None)
        return 0;
    r = PyObject_CallNoArgs(tune);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* A body of n bytes whose first *have came with its head (at start), the rest received straight
 * into it by recv_rest (which sets *status, *have and *err). Returns it, complete or not, or
 * NULL with an exception set. */
static PyObject *
body_after(int fd, const char *start, Py_ssize_t *have, Py_ssize_t n, double deadline,
           double timeout, int shrink, PyObject *tune, int *status, int *err)
{
    PyObject *body;
    if (n >= LARGE_BODY && call_tuner(tune) < 0)
        return NULL;
    body = PyBytes_FromStringAndSize(NULL, n);
    if (body == NULL)
        return NULL;
    memcpy(PyBytes_AS_STRING(body), start, (size_t)*have);
    /* Nothing else holds body yet, so receiving into it without the GIL is safe. */
    *status = recv_rest(fd, PyBytes_AS_STRING(body), have, n, deadline, timeout, shrink, err);
    return body;
}

/* The fallback of exchange(): what arrived, for the Python parser, and whether the peer closed. */
static PyObject *
handback(const char *head, Py_ssize_t head_len, const char *rest, Py_ssize_t rest_len, int eof)
{
    PyObject *data = PyBytes_FromStringAndSize(NULL, head_len + rest_len);
    if (data == NULL)
        return NULL;
    memcpy(PyBytes_AS_STRING(data), head, (size_t)head_len);
    if (rest_len)
        memcpy(PyBytes_AS_STRING(data) + head_len, rest, (size_t)rest_len);
    return Py_BuildValue("(NO)", data, eof ? Py_True : Py_False);
}

static int
as_fd(PyObject *obj)
{
    long fd = PyLong_AsLong(obj);
    if (fd == -1 && PyErr_Occurred())
        return -1;
    if (fd < 0 || fd > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "invalid file descriptor");
        return -1;
    }
    return (int)fd;
}

/* What recognises an answer's head: the body's length, with *after set at the body; or -1. */
typedef Py_ssize_t (*head_parser)(const char *buf, Py_ssize_t len, const char **after,
                                  void *fields);

static Py_ssize_t
ok_head(const char *buf, Py_ssize_t len, const char **after, void *fields)
{
    (void)fields;
    return parse_ok(buf, len, after);
}

struct batch_fields {
    long long seq, count;
};

static Py_ssize_t
batch_head(const char *buf, Py_ssize_t len, const char **after, void *fields)
{
    struct batch_fields *f = fields;
    return parse_batch_head(buf, len, &f->seq, &f->count, after);
}

/* Send iov (nothing if iovcnt is 0), then receive one answer whose head parse recognises, with
 * its whole body, bounded by timeout. With arm (a long poll: the socket has no receive timeout,
 * the answer may take as long as it must to start), the bound starts when the head has come and
 * the socket is left without a receive timeout again.
 * Returns the body, with *head_len set and the head still in buf (RECV_SIZE bytes); or NULL
 * with *back set to (received, eof) for the Python parser; or NULL with an exception set. */
static PyObject *
receive_answer(int fd, struct iovec *iov, int iovcnt, char *buf, head_parser parse,
               void *fields, Py_ssize_t max_body, double timeout, int arm, PyObject *tune,
               Py_ssize_t *head_len, PyObject **back)
{
    double deadline = monotonic() + timeout;
    Py_ssize_t got, n, have;
    const char *after;
    PyObject *body;
    int err = 0, status;

    *back = NULL;
    got = send_recv(fd, iov, iovcnt, buf, RECV_SIZE, &err);
    if (got < 0) {
        raise_errno(err);
        return NULL;
    }
    if (got == 0) {
        *back = handback(buf, 0, NULL, 0, 1);
        return NULL;
    }
    /* More than one answer (bytes nobody asked for) is the Python parser's to report. */
    if ((n = parse(buf, got, &after, fields)) < 0 || n > max_body
        || (have = got - (after - buf)) > n) {
        *back = handback(buf, got, NULL, 0, 0);
        return NULL;
    }
    *head_len = after - buf;
    if (have == n)
        return PyBytes_FromStringAndSize(after, n);
    if (arm) {
        deadline = monotonic() + timeout;
        set_recv_timeout(fd, timeout);
    }
    body = body_after(fd, after, &have, n, deadline, timeout, 1, tune, &status, &err);
    if (arm)
        clear_recv_timeout(fd);
    if (body == NULL || status == 1)
        return body;
    if (status == 0)
        *back = handback(buf, *head_len, PyBytes_AS_STRING(body), have, 1);
    else if (err == ETIMEDOUT || (arm && (err == EAGAIN || err == EWOULDBLOCK)))
        PyErr_SetString(PyExc_TimeoutError, "response not complete within the timeout");
    else
        raise_errno(err);
    Py_DECREF(body);
    return NULL;
}

PyDoc_STRVAR(exchange_doc,
"exchange(fd, prefix, data, timeout, max_body, tune) -> bytes | tuple[bytes, bool]\n\n"
"Send prefix + len(data) + CRLFCRLF + data; return the body of a plain 200 OK answer, or\n"
"(received, eof) for the Python parser to finish.");

static PyObject *
fast_exchange(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    int fd;
    Py_buffer data;
    char length_line[32];
    struct iovec iov[3];
    double timeout;
    Py_ssize_t max_body, head_len;
    char *buf;
    PyObject *body, *back;

    (void)module;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "exchange() takes 6 arguments");
        return NULL;
    }
    if ((fd = as_fd(args[0])) < 0)
        return NULL;
    if (!PyBytes_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "prefix must be bytes");
        return NULL;
    }
    timeout = PyFloat_AsDouble(args[3]);
    if (timeout == -1.0 && PyErr_Occurred())
        return NULL;
    max_body = PyLong_AsSsize_t(args[4]);
    if (max_body == -1 && PyErr_Occurred())
        return NULL;
    if (PyObject_GetBuffer(args[2], &data, PyBUF_SIMPLE) < 0)
        return NULL;
    iov[0].iov_base = PyBytes_AS_STRING(args[1]);
    iov[0].iov_len = (size_t)PyBytes_GET_SIZE(args[1]);
    iov[1].iov_base = length_line;
    iov[1].iov_len = (size_t)PyOS_snprintf(length_line, sizeof(length_line), "%zd\r\n\r\n",
                                           data.len);
    iov[2].iov_base = data.buf;
    iov[2].iov_len = (size_t)data.len;
    buf = PyMem_Malloc(RECV_SIZE);
    if (buf == NULL) {
        PyBuffer_Release(&data);
        return PyErr_NoMemory();
    }
    body = receive_answer(fd, iov, data.len ? 3 : 2, buf, ok_head, NULL, max_body, timeout, 0,
                          args[5], &head_len, &back);
    PyBuffer_Release(&data);
    PyMem_Free(buf);
    return body != NULL ? body : back;
}

PyDoc_STRVAR(ok_body_doc,
"ok_body(data, max_body) -> bytes | None\n\n"
"The body if data is exactly one whole plain 200 OK with a Content-Length, else None.");

static PyObject *
fast_ok_body(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    const char *buf, *after;
    Py_ssize_t len, n, max_body;

    (void)module;
    if (bytes_and_size(args, nargs, "ok_body", &buf, &len, &max_body) < 0)
        return NULL;
    if ((n = parse_ok(buf, len, &after)) < 0 || n > max_body || (after - buf) + n != len)
        Py_RETURN_NONE;
    return PyBytes_FromStringAndSize(after, n);
}

/* "POST /target HTTP/1.1\r\nHost: ..." at buf: the target, with *p set at the CR that ends the
 * Host line; or 0. */
static int
parse_post_start(const char *buf, Py_ssize_t got, const char **target, Py_ssize_t *target_len,
                 const char **p_out)
{
    const char *end = buf + got, *p, *host_end;
    if ((size_t)got < sizeof(POST_PREFIX) - 1 || memcmp(buf, POST_PREFIX, sizeof(POST_PREFIX) - 1))
        return 0;
    p = buf + 5; /* the target starts at its '/' */
    *target = p;
    while (p < end && *p > ' ' && *p < 0x7f)
        p++;
    *target_len = p - *target;
    if ((size_t)(end - p) < sizeof(HTTP11_HOST) - 1
        || memcmp(p, HTTP11_HOST, sizeof(HTTP11_HOST) - 1) != 0)
        return 0;
    p += sizeof(HTTP11_HOST) - 1;
    host_end = memchr(p, '\n', (size_t)(end - p));
    if (host_end == NULL || host_end == p || host_end[-1] != '\r')
        return 0;
    *p_out = host_end - 1;
    return 1;
}

/* A complete fast-form request at buf: its target, body bounds; or 0 if it is not one. */
static int
parse_post(const char *buf, Py_ssize_t got, const char **target, Py_ssize_t *target_len,
           const char **body_start, Py_ssize_t *n)
{
    const char *end = buf + got, *p;
    if (!parse_post_start(buf, got, target, target_len, &p))
        return 0;
    if ((size_t)(end - p) < sizeof(LENGTH_PREFIX) - 1
        || memcmp(p, LENGTH_PREFIX, sizeof(LENGTH_PREFIX) - 1) != 0)
        return 0;
    p += sizeof(LENGTH_PREFIX) - 1;
    *n = parse_length(p, end, body_start);
    return *n >= 0;
}

/* The rest of a body that did not come with its head, received straight into it.
 * Returns the body, or NULL with *code set: SERVE_EOF, SERVE_SLOW, or -1 (an exception). */
static PyObject *
receive_body(int fd, const char *start, Py_ssize_t have, Py_ssize_t n, double timeout,
             PyObject *tune, int *code)
{
    double deadline = monotonic() + timeout;
    PyObject *body;
    int err = 0, status;

    *code = -1;
    body = body_after(fd, start, &have, n, deadline, timeout, 0, tune, &status, &err);
    if (body == NULL || status == 1)
        return body;
    if (status == 0)
        *code = SERVE_EOF;
    else if (err == ETIMEDOUT || err == EAGAIN || err == EWOULDBLOCK)
        *code = SERVE_SLOW;
    else
        raise_errno(err);
    Py_DECREF(body);
    return NULL;
}

PyDoc_STRVAR(request_of_doc,
"request_of(data, max_body) -> tuple[bytes, bytes] | None\n\n"
"(target, body) if data is exactly one whole POST with only Host and Content-Length, else None.");

static PyObject *
fast_request_of(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    const char *buf, *target, *body_start;
    Py_ssize_t len, target_len, n, max_body;

    (void)module;
    if (bytes_and_size(args, nargs, "request_of", &buf, &len, &max_body) < 0)
        return NULL;
    if (!parse_post(buf, len, &target, &target_len, &body_start, &n) || n > max_body
        || (body_start - buf) + n != len)
        Py_RETURN_NONE;
    return Py_BuildValue("(y#y#)", target, target_len, body_start, n);
}

PyDoc_STRVAR(poll_of_doc,
"poll_of(data, max_body) -> tuple[bytes, bytes, int, bytes] | None\n\n"
"(target, subscriber, ack, body) if data is exactly one whole long poll as a goplug registry\n"
"sends it, else None.");

static PyObject *
fast_poll_of(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    const char *buf, *end, *target, *p, *token, *body_start;
    Py_ssize_t len, target_len, token_len, n, max_body;
    long long ack;

    (void)module;
    if (bytes_and_size(args, nargs, "poll_of", &buf, &len, &max_body) < 0)
        return NULL;
    end = buf + len;
    if (!parse_post_start(buf, len, &target, &target_len, &p)
        || (size_t)(end - p) < sizeof(SUBSCRIBER_PREFIX) - 1
        || memcmp(p, SUBSCRIBER_PREFIX, sizeof(SUBSCRIBER_PREFIX) - 1) != 0)
        Py_RETURN_NONE;
    token = p + sizeof(SUBSCRIBER_PREFIX) - 1;
    p = memchr(token, '\r', (size_t)(end - token));
    if (p == NULL || (size_t)(end - p) < sizeof(ACK_PREFIX) - 1
        || memcmp(p, ACK_PREFIX, sizeof(ACK_PREFIX) - 1) != 0)
        Py_RETURN_NONE;
    token_len = p - token;
    p += sizeof(ACK_PREFIX) - 1;
    if ((ack = parse_field(&p, end, LENGTH_PREFIX, sizeof(LENGTH_PREFIX) - 1)) < 0)
        Py_RETURN_NONE;
    n = parse_length(p, end, &body_start);
    if (n < 0 || n > max_body || (body_start - buf) + n != len)
        Py_RETURN_NONE;
    return Py_BuildValue("(y#y#Ly#)", target, target_len, token, token_len, ack, body_start, n);
}

PyDoc_STRVAR(serve_doc,
"serve(fd, targets, max_body, timeout, tune) -> tuple\n\n"
"Answer requests whose target is a key of targets (bytes -> method) until one needs the\n"
"Python side; return (code, served, ...) as goplug/_fastpath.pyi describes.");

static PyObject *
fast_serve(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    int fd, err = 0, code;
    PyObject *targets, *tune, *result = NULL;
    PyObject *key = NULL, *method = NULL; /* the last target met, and its method */
    PyObject *answer = NULL;              /* sent with the next receive */
    Py_ssize_t max_body, served = 0;
    double timeout;
    char head[64];
    struct iovec iov[2];
    int iovcnt = 0;
    char *buf;

    (void)module;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "serve() takes 5 arguments");
        return NULL;
    }
    if ((fd = as_fd(args[0])) < 0)
        return NULL;
    targets = args[1];
    if (!PyDict_Check(targets)) {
        PyErr_SetString(PyExc_TypeError, "targets must be a dict");
        return NULL;
    }
    max_body = PyLong_AsSsize_t(args[2]);
    if (max_body == -1 && PyErr_Occurred())
        return NULL;
    timeout = PyFloat_AsDouble(args[3]);
    if (timeout == -1.0 && PyErr_Occurred())
        return NULL;
    tune = args[4];
    buf = PyMem_Malloc(RECV_SIZE);
    if (buf == NULL)
        return PyErr_NoMemory();

    for (;;) {
        const char *target, *body_start;
        Py_ssize_t got, target_len, n, have;
        PyObject *body;

        got = send_recv(fd, iov, iovcnt, buf, RECV_SIZE, &err);
        Py_CLEAR(answer);
        iovcnt = 0;
        if (got < 0) {
            if (err == EAGAIN || err == EWOULDBLOCK)
                result = Py_BuildValue("(in)", SERVE_IDLE, served);
            else
                raise_errno(err);
            break;
        }
        if (got == 0) {
            result = Py_BuildValue("(in)", SERVE_EOF, served);
            break;
        }
        if (!parse_post(buf, got, &target, &target_len, &body_start, &n) || n > max_body
            || (have = got - (body_start - buf)) > n) {
            result = Py_BuildValue("(iny#)", SERVE_DATA, served, buf, got);
            break;
        }
        if (key == NULL || PyBytes_GET_SIZE(key) != target_len
            || memcmp(PyBytes_AS_STRING(key), target, (size_t)target_len) != 0) {
            Py_CLEAR(key);
            Py_CLEAR(method);
            key = PyBytes_FromStringAndSize(target, target_len);
            if (key == NULL)
                break;
            method = PyDict_GetItemWithError(targets, key); /* borrowed */
            if (method == NULL) {
                if (!PyErr_Occurred())
                    result = Py_BuildValue("(iny#)", SERVE_DATA, served, buf, got);
                break;
            }
            Py_INCREF(method);
        }
        if (have == n) {
            body = PyBytes_FromStringAndSize(body_start, n);
            if (body == NULL)
                break;
        } else {
            body = receive_body(fd, body_start, have, n, timeout, tune, &code);
            if (body == NULL) {
                if (code >= 0)
                    result = Py_BuildValue("(in)", code, served);
                break;
            }
        }
        answer = PyObject_CallOneArg(method, body);
        Py_DECREF(body);
        if (answer == NULL) {
            PyObject *type, *value, *tb;
            if (!PyErr_ExceptionMatches(PyExc_Exception)) /* KeyboardInterrupt, SystemExit */
                break;
            PyErr_Fetch(&type, &value, &tb);
            PyErr_NormalizeException(&type, &value, &tb);
            if (tb != NULL && value != NULL)
                PyException_SetTraceback(value, tb);
            result = Py_BuildValue("(inOO)", SERVE_RAISED, served, key, value ? value : Py_None);
            Py_XDECREF(type);
            Py_XDECREF(value);
            Py_XDECREF(tb);
            break;
        }
        if (!PyBytes_CheckExact(answer)) {
            result = Py_BuildValue("(inOO)", SERVE_RESULT, served, key, answer);
            break;
        }
        iov[0].iov_base = head;
        iov[0].iov_len = (size_t)PyOS_snprintf(
            head, sizeof(head), "HTTP/1.1 200 OK\r\nContent-Length: %zd\r\n\r\n",
            PyBytes_GET_SIZE(answer));
        iov[1].iov_base = PyBytes_AS_STRING(answer);
        iov[1].iov_len = (size_t)PyBytes_GET_SIZE(answer);
        iovcnt = iov[1].iov_len ? 2 : 1;
        served++;
    }
    Py_XDECREF(answer);
    Py_XDECREF(key);
    Py_XDECREF(method);
    PyMem_Free(buf);
    return result;
}

/* The notifications of a batch body; NULL without an exception if its records do not add up to
 * exactly count and the body, NULL with one if memory ran out. */
static PyObject *
split_batch(const char *body, Py_ssize_t n, long long count)
{
    PyObject *items;
    Py_ssize_t pos = 0, i;
    if (count > n / 4)
        return NULL;
    items = PyList_New((Py_ssize_t)count);
    if (items == NULL)
        return NULL;
    for (i = 0; i < (Py_ssize_t)count; i++) {
        const unsigned char *q = (const unsigned char *)body + pos;
        Py_ssize_t size;
        PyObject *item;
        if (n - pos < 4)
            goto bad;
        size = (Py_ssize_t)(((size_t)q[0] << 24) | ((size_t)q[1] << 16) | ((size_t)q[2] << 8)
                            | (size_t)q[3]);
        pos += 4;
        if (size > n - pos)
            goto bad;
        item = PyBytes_FromStringAndSize(body + pos, size);
        if (item == NULL) {
            Py_DECREF(items);
            return NULL;
        }
        PyList_SET_ITEM(items, i, item);
        pos += size;
    }
    if (pos == n)
        return items;
bad:
    Py_DECREF(items);
    return NULL;
}

PyDoc_STRVAR(notifications_doc,
"notifications(fd, request, max_body, timeout, tune) -> tuple[int, list[bytes]] | tuple[bytes, bool]\n\n"
"Send request (a long poll; may be empty), wait without a timeout for the answer to start and\n"
"at most timeout seconds more for the rest, and return (first_seq, notifications) if it is a\n"
"batch as goplug plugins send it, else (received, eof) for the Python parser to finish.");

static PyObject *
fast_notifications(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    int fd;
    Py_buffer request;
    struct iovec iov[1];
    struct batch_fields fields = {0, 0};
    Py_ssize_t max_body, head_len;
    double timeout;
    char *buf;
    PyObject *body, *back, *items;

    (void)module;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "notifications() takes 5 arguments");
        return NULL;
    }
    if ((fd = as_fd(args[0])) < 0)
        return NULL;
    max_body = PyLong_AsSsize_t(args[2]);
    if (max_body == -1 && PyErr_Occurred())
        return NULL;
    timeout = PyFloat_AsDouble(args[3]);
    if (timeout == -1.0 && PyErr_Occurred())
        return NULL;
    if (timeout <= 0) {
        PyErr_SetString(PyExc_ValueError, "timeout must be positive");
        return NULL;
    }
    if (PyObject_GetBuffer(args[1], &request, PyBUF_SIMPLE) < 0)
        return NULL;
    iov[0].iov_base = request.buf;
    iov[0].iov_len = (size_t)request.len;
    buf = PyMem_Malloc(RECV_SIZE);
    if (buf == NULL) {
        PyBuffer_Release(&request);
        return PyErr_NoMemory();
    }
    /* The poll waits as long as it has to; the answer's body follows its head at once. */
    body = receive_answer(fd, iov, request.len ? 1 : 0, buf, batch_head, &fields, max_body,
                          timeout, 1, args[4], &head_len, &back);
    PyBuffer_Release(&request);
    if (body != NULL) {
        items = split_batch(PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body), fields.count);
        if (items != NULL)
            back = Py_BuildValue("(LN)", fields.seq, items);
        else if (!PyErr_Occurred())
            back = handback(buf, head_len, PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body), 0);
        Py_DECREF(body);
    }
    PyMem_Free(buf);
    return back;
}

static PyMethodDef fastpath_methods[] = {
    {"exchange", (PyCFunction)(void (*)(void))fast_exchange, METH_FASTCALL, exchange_doc},
    {"serve", (PyCFunction)(void (*)(void))fast_serve, METH_FASTCALL, serve_doc},
    {"ok_body", (PyCFunction)(void (*)(void))fast_ok_body, METH_FASTCALL, ok_body_doc},
    {"request_of", (PyCFunction)(void (*)(void))fast_request_of, METH_FASTCALL, request_of_doc},
    {"poll_of", (PyCFunction)(void (*)(void))fast_poll_of, METH_FASTCALL, poll_of_doc},
    {"notifications", (PyCFunction)(void (*)(void))fast_notifications, METH_FASTCALL,
     notifications_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fastpath_module = {
    PyModuleDef_HEAD_INIT, "goplug._fastpath",
    "The common case of a goplug call in C (see goplug/_fastpath.pyi).", -1, fastpath_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__fastpath(void)
{
    PyObject *m = PyModule_Create(&fastpath_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "EOF", SERVE_EOF) < 0
        || PyModule_AddIntConstant(m, "IDLE", SERVE_IDLE) < 0
        || PyModule_AddIntConstant(m, "DATA", SERVE_DATA) < 0
        || PyModule_AddIntConstant(m, "RAISED", SERVE_RAISED) < 0
        || PyModule_AddIntConstant(m, "RESULT", SERVE_RESULT) < 0
        || PyModule_AddIntConstant(m, "SLOW", SERVE_SLOW) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
