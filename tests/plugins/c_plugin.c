/*
 * c_plugin: a GoPlug-0.1.0-style plugin written in C (libc + pthreads only), for tests.
 *
 *     cc -O2 -Wall -Wextra -pthread -o c_plugin c_plugin.c
 *     c_plugin DIR [NAME [NAMESPACE]]          (defaults: NAME "CDo", NAMESPACE "C")
 *
 * DIR defaults to $GOPLUG_DIR. The plugin knows nothing of goplug: like a Go plugin it listens on
 * DIR/<NAMESPACE><NAME>.sock (absolute path), then writes DIR/<NAMESPACE><NAME>.pconf
 * (atomically: a ".<...>.tmp" file renamed into place; both files mode 0600) with
 *
 *     {"Name":"NAME","NameSpace":"NAMESPACE","Url":"unix://NAMESPACENAME","Sock":"/abs.sock",
 *      "LazyLoad":false}
 *
 * and prints "ready" on stdout. A socket file left by a dead process (connect() is refused) is
 * removed first; if something still accepts connections there, it exits 1.
 *
 * HTTP/1.1 on the socket, one detached thread per connection, persistent connections, pipelined
 * requests served in order. Request bodies are framed by Content-Length (absent: empty) or
 * Transfer-Encoding: chunked. Head over 64 KiB (or over 100 header lines) or body over 64 MiB:
 * 413 and close. Malformed request: 400 and close.
 *
 * Routes (the first path segment, %-decoded):
 *   /Activate          ["Echo","Upper","Pid","Exit","Sleep"]
 *   /Ping, /Echo       the request body
 *   /Stop              "stopped" (the plugin keeps serving)
 *   /Upper             the body, ASCII upper-cased
 *   /Pid               the process id, decimal
 *   /Exit              body = decimal exit code (empty: 0): _exit(code) at once, no answer
 *   /Sleep             body = milliseconds: sleeps, then answers an empty body
 *   /RegisterCallback  long poll that never ends: no answer until the peer closes
 *   anything else      404, {"type":"MethodNotFound","message":"no method 'X'"}
 *   A bad number for /Exit or /Sleep: 500, {"type":"ValueError","message":"..."}.
 *
 * SIGTERM / SIGINT: removes the .pconf, then the socket, exits 0 (handled by a sigwait thread).
 * With C_PLUGIN_IGNORE_SIGTERM=1 in the environment, SIGTERM is ignored.
 * Every stderr line starts with "c_plugin: ". Usage errors exit 2, start-up failures exit 1.
 */
#define _POSIX_C_SOURCE 200809L
#define _DEFAULT_SOURCE

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0 /* SIGPIPE is ignored anyway */
#endif

#define MAX_HEAD ((size_t)64 * 1024)
#define MAX_HEADER_LINES 100
#define MAX_BODY ((size_t)64 * 1024 * 1024)
#define INITIAL_BUFFER ((size_t)16 * 1024)
#define KEEP_BUFFER ((size_t)1024 * 1024) /* an idle connection keeps at most this much */
#define MAX_CHUNK_LINE ((size_t)4096)

static const char ACTIVATE_BODY[] = "[\"Echo\",\"Upper\",\"Pid\",\"Exit\",\"Sleep\"]";

/* Files this process created, removed on SIGTERM/SIGINT (under g_files_lock). */
static pthread_mutex_t g_files_lock = PTHREAD_MUTEX_INITIALIZER;
static char *g_sock_path;
static char *g_pconf_path;
static int g_sock_created;
static int g_pconf_created;
static int g_listen_fd = -1;

/* ------------------------------------------------------------------------------------------ */
/* small helpers                                                                              */
/* ------------------------------------------------------------------------------------------ */

static int write_all(int fd, const void *data, size_t len)
{
    const char *p = data;
    while (len > 0) {
        ssize_t n = write(fd, p, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* One stderr line, "c_plugin: " + message, in a single write. */
static void log_line(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void log_line(const char *fmt, ...)
{
    char line[1024];
    size_t prefix = (size_t)snprintf(line, sizeof line, "c_plugin: ");
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line + prefix, sizeof line - prefix - 1, fmt, ap);
    va_end(ap);
    size_t len = prefix + (n < 0 ? 0 : (size_t)n);
    if (len > sizeof line - 2)
        len = sizeof line - 2;
    for (size_t i = prefix; i < len; i++) /* keep it one line */
        if (line[i] == '\n' || line[i] == '\r')
            line[i] = ' ';
    line[len++] = '\n';
    (void)write_all(STDERR_FILENO, line, len);
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (p == NULL) {
        log_line("out of memory");
        _exit(1);
    }
    return p;
}

/* A growable byte string. */
struct sbuf {
    char *data;
    size_t len;
    size_t cap;
};

static int sbuf_reserve(struct sbuf *sb, size_t extra)
{
    if (sb->cap - sb->len >= extra)
        return 0;
    size_t cap = sb->cap ? sb->cap : 256;
    while (cap - sb->len < extra)
        cap *= 2;
    char *p = realloc(sb->data, cap);
    if (p == NULL)
        return -1;
    sb->data = p;
    sb->cap = cap;
    return 0;
}

static int sbuf_add(struct sbuf *sb, const void *data, size_t len)
{
    if (sbuf_reserve(sb, len + 1) != 0)
        return -1;
    memcpy(sb->data + sb->len, data, len);
    sb->len += len;
    sb->data[sb->len] = '\0';
    return 0;
}

static int sbuf_str(struct sbuf *sb, const char *s)
{
    return sbuf_add(sb, s, strlen(s));
}

/* Length of the valid UTF-8 sequence at s (0 if invalid). */
static size_t utf8_seq_len(const unsigned char *s, size_t n)
{
    unsigned c = s[0];
    size_t len;
    uint32_t cp, min;
    if (c < 0x80)
        return 1;
    if (c >= 0xc2 && c <= 0xdf) {
        len = 2, cp = c & 0x1f, min = 0x80;
    } else if ((c & 0xf0) == 0xe0) {
        len = 3, cp = c & 0x0f, min = 0x800;
    } else if (c >= 0xf0 && c <= 0xf4) {
        len = 4, cp = c & 0x07, min = 0x10000;
    } else {
        return 0;
    }
    if (n < len)
        return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80)
            return 0;
        cp = (cp << 6) | (s[i] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
        return 0;
    return len;
}

/* Append s as the inside of a JSON string (invalid UTF-8 becomes U+FFFD). */
static int json_escape(struct sbuf *sb, const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned char c = s[i];
        char tmp[8];
        if (c == '"' || c == '\\') {
            tmp[0] = '\\', tmp[1] = (char)c;
            if (sbuf_add(sb, tmp, 2) != 0)
                return -1;
            i++;
        } else if (c < 0x20 || c == 0x7f) {
            snprintf(tmp, sizeof tmp, "\\u%04x", c);
            if (sbuf_add(sb, tmp, 6) != 0)
                return -1;
            i++;
        } else if (c < 0x80) {
            if (sbuf_add(sb, &s[i], 1) != 0)
                return -1;
            i++;
        } else {
            size_t len = utf8_seq_len(s + i, n - i);
            if (len == 0) {
                if (sbuf_str(sb, "\\ufffd") != 0)
                    return -1;
                i++;
            } else {
                if (sbuf_add(sb, s + i, len) != 0)
                    return -1;
                i += len;
            }
        }
    }
    return 0;
}

/* DIR as an absolute, lexically cleaned path (like Go's filepath.Abs). NULL on error. */
static char *absolute_path(const char *dir)
{
    char *joined;
    if (dir[0] == '/') {
        joined = xmalloc(strlen(dir) + 1);
        strcpy(joined, dir);
    } else {
        char *cwd = getcwd(NULL, 0);
        if (cwd == NULL)
            return NULL;
        joined = xmalloc(strlen(cwd) + strlen(dir) + 2);
        sprintf(joined, "%s/%s", cwd, dir);
        free(cwd);
    }
    char *out = xmalloc(strlen(joined) + 2);
    size_t o = 0;
    const char *p = joined;
    while (*p) {
        while (*p == '/')
            p++;
        if (*p == '\0')
            break;
        const char *seg = p;
        while (*p && *p != '/')
            p++;
        size_t n = (size_t)(p - seg);
        if (n == 1 && seg[0] == '.')
            continue;
        if (n == 2 && seg[0] == '.' && seg[1] == '.') {
            while (o > 0 && out[o - 1] != '/')
                o--;
            if (o > 0)
                o--;
            continue;
        }
        out[o++] = '/';
        memcpy(out + o, seg, n);
        o += n;
    }
    if (o == 0)
        out[o++] = '/';
    out[o] = '\0';
    free(joined);
    return out;
}

static int valid_part(const char *s, int may_be_empty)
{
    if (*s == '\0')
        return may_be_empty;
    if (strcmp(s, ".") == 0 || strcmp(s, "..") == 0)
        return 0;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++)
        if (*p == '/' || *p < 0x20 || *p == 0x7f)
            return 0;
    return 1;
}

/* Decimal number in [0, max] after trimming ASCII white space; -1 if it is not one. */
static long long parse_decimal(const unsigned char *s, size_t n, long long max, int empty_value)
{
    while (n > 0 && (*s == ' ' || *s == '\t' || *s == '\r' || *s == '\n'))
        s++, n--;
    while (n > 0 && (s[n - 1] == ' ' || s[n - 1] == '\t' || s[n - 1] == '\r' || s[n - 1] == '\n'))
        n--;
    if (n == 0)
        return empty_value;
    long long v = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        v = v * 10 + (s[i] - '0');
        if (v > max)
            return -1;
    }
    return v;
}

/* ------------------------------------------------------------------------------------------ */
/* one connection                                                                             */
/* ------------------------------------------------------------------------------------------ */

struct conn {
    int fd;
    unsigned char *buf;
    size_t cap;
    size_t start; /* first byte not consumed yet */
    size_t len;   /* end of the bytes received */
};

struct request {
    char *route; /* %-decoded first path segment (may hold NUL bytes) */
    size_t route_len;
    unsigned char *body;
    size_t body_len;
    struct sbuf chunked; /* owns the body of a chunked request */
    int close_after;
};

enum outcome { KEEP = 1, CLOSE = 0 };

/* Room for at least `need` more bytes after c->len (compacting, then growing). */
static int conn_reserve(struct conn *c, size_t need)
{
    if (c->cap - c->len >= need)
        return 0;
    if (c->start > 0) {
        memmove(c->buf, c->buf + c->start, c->len - c->start);
        c->len -= c->start;
        c->start = 0;
        if (c->cap - c->len >= need)
            return 0;
    }
    size_t cap = c->cap ? c->cap : INITIAL_BUFFER;
    while (cap - c->len < need)
        cap *= 2;
    unsigned char *p = realloc(c->buf, cap);
    if (p == NULL)
        return -1;
    c->buf = p;
    c->cap = cap;
    return 0;
}

/* One recv() into the buffer: >0 bytes read, 0 end of file, -1 error. */
static ssize_t conn_read(struct conn *c, size_t want)
{
    if (want < 4096)
        want = 4096;
    if (conn_reserve(c, want) != 0)
        return -1;
    for (;;) {
        ssize_t n = recv(c->fd, c->buf + c->len, c->cap - c->len, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n > 0)
            c->len += (size_t)n;
        return n;
    }
}

static size_t conn_avail(const struct conn *c)
{
    return c->len - c->start;
}

static void conn_consume(struct conn *c, size_t n)
{
    c->start += n;
    if (c->start == c->len) {
        c->start = c->len = 0;
        if (c->cap > KEEP_BUFFER) { /* give back the memory of a large body */
            free(c->buf);
            c->buf = NULL;
            c->cap = 0;
        }
    }
}

/* Make at least n bytes available from c->start: 1 ok, 0 end of file first, -1 error. */
static int conn_fill(struct conn *c, size_t n)
{
    while (conn_avail(c) < n) {
        size_t missing = n - conn_avail(c);
        ssize_t r = conn_read(c, missing < ((size_t)1 << 20) ? missing : ((size_t)1 << 20));
        if (r <= 0)
            return (int)r;
    }
    return 1;
}

static int send_iov(int fd, struct iovec *iov, int count)
{
    while (count > 0) {
        struct msghdr msg;
        memset(&msg, 0, sizeof msg);
        msg.msg_iov = iov;
        msg.msg_iovlen = (size_t)count;
        ssize_t n = sendmsg(fd, &msg, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        size_t done = (size_t)n;
        while (count > 0 && done >= iov->iov_len) {
            done -= iov->iov_len;
            iov++;
            count--;
        }
        if (count > 0) {
            iov->iov_base = (char *)iov->iov_base + done;
            iov->iov_len -= done;
        }
    }
    return 0;
}

static int send_response(int fd, int status, const char *reason, const char *content_type,
                         const void *body, size_t body_len, int close_after)
{
    char head[256];
    int n = snprintf(head, sizeof head, "HTTP/1.1 %d %s\r\nContent-Length: %zu\r\n%s%s%s%s\r\n",
                     status, reason, body_len, content_type ? "Content-Type: " : "",
                     content_type ? content_type : "", content_type ? "\r\n" : "",
                     close_after ? "Connection: close\r\n" : "");
    struct iovec iov[2];
    iov[0].iov_base = head;
    iov[0].iov_len = (size_t)n;
    iov[1].iov_base = (void *)body;
    iov[1].iov_len = body_len;
    return send_iov(fd, iov, 2);
}

/* An error status with an empty body, then the connection is closed. Lingers a little so the
 * peer reads the answer before it learns that the rest of what it sent was thrown away. */
static enum outcome fail(struct conn *c, int status, const char *reason)
{
    if (send_response(c->fd, status, reason, NULL, "", 0, 1) == 0) {
        shutdown(c->fd, SHUT_WR);
        struct timeval tv = {0, 200 * 1000};
        setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        char scratch[16384];
        size_t drained = 0;
        while (drained < MAX_BODY / 4) {
            ssize_t r = recv(c->fd, scratch, sizeof scratch, 0);
            if (r < 0 && errno == EINTR)
                continue;
            if (r <= 0)
                break;
            drained += (size_t)r;
        }
    }
    return CLOSE;
}

/* Wait for the peer to close (a long poll that is never answered). */
static enum outcome hold_until_closed(struct conn *c)
{
    char scratch[4096];
    for (;;) {
        ssize_t r = recv(c->fd, scratch, sizeof scratch, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return CLOSE;
    }
}

/* Read the head: its length (bytes up to and including the empty line), 0 at a clean end of
 * file, -1 on a broken connection, -2 if it is too large. Leading empty lines are skipped. */
static long read_head(struct conn *c)
{
    size_t scanned = 0;
    for (;;) {
        if (scanned == 0)
            while (conn_avail(c) > 0 && (c->buf[c->start] == '\r' || c->buf[c->start] == '\n'))
                conn_consume(c, 1);
        const unsigned char *p = c->buf + c->start;
        size_t avail = conn_avail(c);
        size_t i = scanned;
        while (i < avail) {
            if (p[i] == '\n') {
                if (i + 1 >= avail)
                    break;
                if (p[i + 1] == '\n')
                    return i + 2 > MAX_HEAD ? -2 : (long)(i + 2);
                if (p[i + 1] == '\r') {
                    if (i + 2 >= avail)
                        break;
                    if (p[i + 2] == '\n')
                        return i + 3 > MAX_HEAD ? -2 : (long)(i + 3);
                }
            }
            i++;
        }
        scanned = i;
        if (avail > MAX_HEAD)
            return -2;
        ssize_t r = conn_read(c, 4096);
        if (r == 0)
            return avail == 0 ? 0 : -1;
        if (r < 0)
            return -1;
    }
}

static int is_tchar(unsigned char ch)
{
    if ((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z'))
        return 1;
    return ch != '\0' && strchr("!#$%&'*+-.^_`|~", ch) != NULL;
}

static int hex_value(unsigned char ch)
{
    if (ch >= '0' && ch <= '9')
        return ch - '0';
    if (ch >= 'a' && ch <= 'f')
        return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F')
        return ch - 'A' + 10;
    return -1;
}

/* Does the comma-separated list `v` hold `token` (case-insensitive)? */
static int has_token(const unsigned char *v, size_t n, const char *token)
{
    size_t tlen = strlen(token), i = 0;
    while (i < n) {
        while (i < n && (v[i] == ' ' || v[i] == '\t' || v[i] == ','))
            i++;
        size_t s = i;
        while (i < n && v[i] != ',')
            i++;
        size_t e = i;
        while (e > s && (v[e - 1] == ' ' || v[e - 1] == '\t'))
            e--;
        if (e - s == tlen && strncasecmp((const char *)v + s, token, tlen) == 0)
            return 1;
    }
    return 0;
}

static int header_is(const unsigned char *name, size_t n, const char *want)
{
    return n == strlen(want) && strncasecmp((const char *)name, want, n) == 0;
}

/* Parse the head at c->buf + c->start (head_len bytes). Returns 0 or an HTTP error status.
 * On success fills req->route, req->close_after and the framing. */
static int parse_head(struct conn *c, size_t head_len, struct request *req,
                      long long *content_length, int *chunked, int *expect_continue)
{
    unsigned char *p = c->buf + c->start;
    unsigned char *end = p + head_len;

    /* request line */
    unsigned char *eol = memchr(p, '\n', head_len);
    unsigned char *line_end = (eol > p && eol[-1] == '\r') ? eol - 1 : eol;
    unsigned char *sp1 = memchr(p, ' ', (size_t)(line_end - p));
    if (sp1 == NULL || sp1 == p)
        return 400;
    for (unsigned char *q = p; q < sp1; q++)
        if (!is_tchar(*q))
            return 400;
    unsigned char *target = sp1 + 1;
    unsigned char *sp2 = memchr(target, ' ', (size_t)(line_end - target));
    if (sp2 == NULL || sp2 == target)
        return 400;
    size_t vlen = (size_t)(line_end - (sp2 + 1));
    int http10;
    if (vlen == 8 && memcmp(sp2 + 1, "HTTP/1.1", 8) == 0)
        http10 = 0;
    else if (vlen == 8 && memcmp(sp2 + 1, "HTTP/1.0", 8) == 0)
        http10 = 1;
    else
        return 400;
    for (unsigned char *q = target; q < sp2; q++)
        if (*q <= 0x20 || *q == 0x7f)
            return 400;

    /* path: origin form "/x/y?q", or absolute form "scheme://host/x/y" */
    unsigned char *path = target, *path_end = sp2;
    for (unsigned char *q = path; q < path_end; q++)
        if (*q == '?' || *q == '#') {
            path_end = q;
            break;
        }
    if (*path != '/') {
        unsigned char *q = path;
        while (q < path_end && ((*q >= 'a' && *q <= 'z') || (*q >= 'A' && *q <= 'Z')))
            q++;
        if (q == path || path_end - q < 3 || memcmp(q, "://", 3) != 0)
            return 400;
        q += 3;
        while (q < path_end && *q != '/')
            q++;
        path = q;
    }
    /* %-decode the path in place, then take its first segment */
    unsigned char *w = path;
    for (unsigned char *q = path; q < path_end; q++) {
        if (*q == '%') {
            if (path_end - q < 3)
                return 400;
            int hi = hex_value(q[1]), lo = hex_value(q[2]);
            if (hi < 0 || lo < 0)
                return 400;
            *w++ = (unsigned char)(hi * 16 + lo);
            q += 2;
        } else {
            *w++ = *q;
        }
    }
    unsigned char *seg = path, *seg_end = path;
    if (path < w && *path == '/') {
        seg = path + 1;
        seg_end = seg;
        while (seg_end < w && *seg_end != '/')
            seg_end++;
    }
    req->route_len = (size_t)(seg_end - seg);
    req->route = xmalloc(req->route_len + 1);
    memcpy(req->route, seg, req->route_len);
    req->route[req->route_len] = '\0';

    /* header lines */
    int lines = 0, have_te = 0, keep_alive = 0;
    *content_length = -1;
    *chunked = 0;
    *expect_continue = 0;
    req->close_after = 0;
    unsigned char *q = eol + 1;
    while (q < end) {
        unsigned char *nl = memchr(q, '\n', (size_t)(end - q));
        unsigned char *le = (nl > q && nl[-1] == '\r') ? nl - 1 : nl;
        if (le == q)
            break; /* the empty line */
        if (++lines > MAX_HEADER_LINES)
            return 413;
        if (*q == ' ' || *q == '\t')
            return 400; /* obsolete line folding */
        unsigned char *colon = memchr(q, ':', (size_t)(le - q));
        if (colon == NULL || colon == q)
            return 400;
        for (unsigned char *k = q; k < colon; k++)
            if (!is_tchar(*k))
                return 400;
        unsigned char *v = colon + 1, *ve = le;
        while (v < ve && (*v == ' ' || *v == '\t'))
            v++;
        while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t'))
            ve--;
        for (unsigned char *k = v; k < ve; k++)
            if ((*k < 0x20 && *k != '\t') || *k == 0x7f)
                return 400;
        size_t nlen = (size_t)(colon - q), vl = (size_t)(ve - v);
        if (header_is(q, nlen, "content-length")) {
            long long cl = parse_decimal(v, vl, (long long)MAX_BODY + 1, -1);
            if (vl == 0 || cl < 0) {
                /* all digits but too large is 413, anything else 400 */
                size_t k = 0;
                while (k < vl && v[k] >= '0' && v[k] <= '9')
                    k++;
                if (vl == 0 || k != vl)
                    return 400;
                cl = (long long)MAX_BODY + 1;
            }
            if (*content_length >= 0 && *content_length != cl)
                return 400;
            *content_length = cl;
        } else if (header_is(q, nlen, "transfer-encoding")) {
            if (have_te || !(vl == 7 && strncasecmp((const char *)v, "chunked", 7) == 0))
                return 400;
            have_te = 1;
        } else if (header_is(q, nlen, "connection")) {
            if (has_token(v, vl, "close"))
                req->close_after = 1;
            if (has_token(v, vl, "keep-alive"))
                keep_alive = 1;
        } else if (header_is(q, nlen, "expect")) {
            if (!(vl == 12 && strncasecmp((const char *)v, "100-continue", 12) == 0))
                return 417;
            *expect_continue = 1;
        }
        q = nl + 1;
    }
    if (have_te && *content_length >= 0)
        return 400;
    *chunked = have_te;
    if (*content_length > (long long)MAX_BODY)
        return 413;
    if (http10 && !keep_alive)
        req->close_after = 1;
    return 0;
}

/* A line (up to and including '\n') of at most `limit` bytes, at c->buf + c->start: its length,
 * -1 on a broken connection, -2 if too long. */
static long read_line(struct conn *c, size_t limit)
{
    size_t scanned = 0;
    for (;;) {
        unsigned char *nl = NULL;
        if (conn_avail(c) > scanned)
            nl = memchr(c->buf + c->start + scanned, '\n', conn_avail(c) - scanned);
        if (nl != NULL) {
            size_t n = (size_t)(nl - (c->buf + c->start)) + 1;
            return n > limit ? -2 : (long)n;
        }
        scanned = conn_avail(c);
        if (scanned > limit)
            return -2;
        if (conn_read(c, 4096) <= 0)
            return -1;
    }
}

/* Read a chunked body into req->chunked: 0 ok, -1 broken connection, else an HTTP status. */
static int read_chunked(struct conn *c, struct request *req)
{
    size_t total = 0;
    for (;;) {
        long n = read_line(c, MAX_CHUNK_LINE);
        if (n == -1)
            return -1;
        if (n == -2)
            return 400;
        const unsigned char *p = c->buf + c->start, *e = p + n;
        size_t size = 0;
        int digits = 0;
        while (p < e && hex_value(*p) >= 0) {
            if (size > MAX_BODY)
                return 413;
            size = size * 16 + (size_t)hex_value(*p++);
            digits++;
        }
        if (digits == 0)
            return 400;
        while (p < e && (*p == ' ' || *p == '\t'))
            p++;
        if (p < e && *p != ';' && *p != '\r' && *p != '\n')
            return 400;
        conn_consume(c, (size_t)n);
        if (size > MAX_BODY || total + size > MAX_BODY)
            return 413;
        if (size == 0)
            break;
        int r = conn_fill(c, size);
        if (r <= 0)
            return -1;
        if (sbuf_add(&req->chunked, c->buf + c->start, size) != 0)
            return 413;
        total += size;
        conn_consume(c, size);
        n = read_line(c, 2);
        if (n == -1)
            return -1;
        if (n == -2 || !(n == 1 || (n == 2 && c->buf[c->start] == '\r')))
            return 400;
        conn_consume(c, (size_t)n);
    }
    /* trailers, up to the empty line */
    for (int lines = 0;; lines++) {
        long n = read_line(c, MAX_HEAD);
        if (n == -1)
            return -1;
        if (n == -2 || lines > MAX_HEADER_LINES)
            return 413;
        int empty = n == 1 || (n == 2 && c->buf[c->start] == '\r');
        conn_consume(c, (size_t)n);
        if (empty)
            break;
    }
    if (req->chunked.data == NULL && sbuf_add(&req->chunked, "", 0) != 0)
        return 413;
    req->body = (unsigned char *)req->chunked.data;
    req->body_len = req->chunked.len;
    return 0;
}

static int route_is(const struct request *req, const char *name)
{
    return req->route_len == strlen(name) && memcmp(req->route, name, req->route_len) == 0;
}

static enum outcome answer_json_error(struct conn *c, int status, const char *reason,
                                      const char *type, const char *before,
                                      const unsigned char *what, size_t what_len,
                                      const char *after, int close_after)
{
    struct sbuf sb = {0};
    int bad = sbuf_str(&sb, "{\"type\":\"") || json_escape(&sb, (const unsigned char *)type,
                                                            strlen(type)) ||
              sbuf_str(&sb, "\",\"message\":\"") ||
              json_escape(&sb, (const unsigned char *)before, strlen(before)) ||
              json_escape(&sb, what, what_len) ||
              json_escape(&sb, (const unsigned char *)after, strlen(after)) ||
              sbuf_str(&sb, "\"}");
    int sent = bad ? -1
                   : send_response(c->fd, status, reason, "application/json", sb.data, sb.len,
                                   close_after);
    free(sb.data);
    return sent == 0 && !close_after ? KEEP : CLOSE;
}

/* Run the route; answer. */
static enum outcome dispatch(struct conn *c, struct request *req)
{
    const char *octets = "application/octet-stream";
    int close_after = req->close_after;
    const void *out = req->body;
    size_t out_len = req->body_len;
    char small[32];

    if (route_is(req, "Activate")) {
        out = ACTIVATE_BODY;
        out_len = sizeof ACTIVATE_BODY - 1;
    } else if (route_is(req, "Ping") || route_is(req, "Echo")) {
        /* the body as it came */
    } else if (route_is(req, "Stop")) {
        out = "stopped";
        out_len = 7;
    } else if (route_is(req, "Upper")) {
        for (size_t i = 0; i < req->body_len; i++)
            if (req->body[i] >= 'a' && req->body[i] <= 'z')
                req->body[i] = (unsigned char)(req->body[i] - 'a' + 'A');
    } else if (route_is(req, "Pid")) {
        out_len = (size_t)snprintf(small, sizeof small, "%ld", (long)getpid());
        out = small;
    } else if (route_is(req, "Exit")) {
        long long code = parse_decimal(req->body, req->body_len, 255, 0);
        if (code < 0)
            return answer_json_error(c, 500, "Internal Server Error", "ValueError",
                                     "Exit wants an exit code 0-255, not '", req->body,
                                     req->body_len > 64 ? 64 : req->body_len, "'", close_after);
        _exit((int)code);
    } else if (route_is(req, "Sleep")) {
        long long ms = parse_decimal(req->body, req->body_len, 24LL * 3600 * 1000, -1);
        if (ms < 0)
            return answer_json_error(c, 500, "Internal Server Error", "ValueError",
                                     "Sleep wants milliseconds, not '", req->body,
                                     req->body_len > 64 ? 64 : req->body_len, "'", close_after);
        struct timespec ts = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000L};
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
            ;
        out = "";
        out_len = 0;
    } else if (route_is(req, "RegisterCallback")) {
        return hold_until_closed(c);
    } else {
        return answer_json_error(c, 404, "Not Found", "MethodNotFound", "no method '",
                                 (const unsigned char *)req->route, req->route_len, "'",
                                 close_after);
    }
    if (send_response(c->fd, 200, "OK", octets, out, out_len, close_after) != 0)
        return CLOSE;
    return close_after ? CLOSE : KEEP;
}

/* Serve one request: KEEP to go on with the connection, CLOSE to end it. */
static enum outcome serve_one(struct conn *c)
{
    long head_len = read_head(c);
    if (head_len == 0 || head_len == -1)
        return CLOSE;
    if (head_len == -2)
        return fail(c, 413, "Payload Too Large");

    struct request req;
    memset(&req, 0, sizeof req);
    long long content_length;
    int chunked, expect_continue;
    int status = parse_head(c, (size_t)head_len, &req, &content_length, &chunked,
                            &expect_continue);
    enum outcome result = CLOSE;
    if (status == 413) {
        result = fail(c, 413, "Payload Too Large");
        goto done;
    }
    if (status == 417) {
        result = fail(c, 417, "Expectation Failed");
        goto done;
    }
    if (status != 0) {
        result = fail(c, 400, "Bad Request");
        goto done;
    }
    conn_consume(c, (size_t)head_len);

    size_t body_len = content_length > 0 ? (size_t)content_length : 0;
    if (expect_continue && (chunked || body_len > 0) && conn_avail(c) == 0) {
        static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
        struct iovec iov = {(void *)cont, sizeof cont - 1};
        if (send_iov(c->fd, &iov, 1) != 0)
            goto done;
    }
    if (chunked) {
        int r = read_chunked(c, &req);
        if (r == -1)
            goto done;
        if (r == 413) {
            result = fail(c, 413, "Payload Too Large");
            goto done;
        }
        if (r != 0) {
            result = fail(c, 400, "Bad Request");
            goto done;
        }
        result = dispatch(c, &req);
    } else {
        if (conn_fill(c, body_len) <= 0)
            goto done; /* the peer went away in the middle of the body */
        req.body = c->buf + c->start;
        req.body_len = body_len;
        result = dispatch(c, &req);
        conn_consume(c, body_len);
    }
done:
    free(req.route);
    free(req.chunked.data);
    return result;
}

static void *serve_connection(void *arg)
{
    struct conn *c = arg;
    while (serve_one(c) == KEEP)
        ;
    close(c->fd);
    free(c->buf);
    free(c);
    return NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* start-up and stop                                                                          */
/* ------------------------------------------------------------------------------------------ */

static void remove_files_locked(void)
{
    if (g_pconf_created && g_pconf_path != NULL)
        unlink(g_pconf_path);
    g_pconf_created = 0;
    if (g_listen_fd >= 0) {
        close(g_listen_fd);
        g_listen_fd = -1;
    }
    if (g_sock_created && g_sock_path != NULL)
        unlink(g_sock_path);
    g_sock_created = 0;
}

static void *signal_thread(void *arg)
{
    const sigset_t *set = arg;
    for (;;) {
        int sig = 0;
        if (sigwait(set, &sig) != 0)
            continue;
        pthread_mutex_lock(&g_files_lock); /* waits for a start-up in progress */
        remove_files_locked();
        log_line("stopped by signal %d", sig);
        _exit(0);
    }
    return NULL;
}

/* Start-up failed: clean up what was made, exit 1. Called with g_files_lock held. */
static void die_locked(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die_locked(const char *fmt, ...)
{
    char message[900];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
    log_line("%s", message);
    remove_files_locked();
    _exit(1);
}

static void make_address(struct sockaddr_un *addr, const char *path)
{
    memset(addr, 0, sizeof *addr);
    addr->sun_family = AF_UNIX;
    memcpy(addr->sun_path, path, strlen(path) + 1);
}

int main(int argc, char **argv)
{
    const char *dir = argc > 1 ? argv[1] : getenv("GOPLUG_DIR");
    const char *name = argc > 2 ? argv[2] : "CDo";
    const char *ns = argc > 3 ? argv[3] : "C";
    if (dir == NULL || dir[0] == '\0' || argc > 4) {
        log_line("usage: c_plugin DIR [NAME [NAMESPACE]] (DIR defaults to $GOPLUG_DIR, "
                 "which is not set)");
        return 2;
    }
    if (!valid_part(name, 0) || !valid_part(ns, 1)) {
        log_line("invalid plugin name '%s' or namespace '%s'", name, ns);
        return 2;
    }

    /* Signals: SIGTERM and SIGINT go to the sigwait thread only (blocked everywhere else). */
    signal(SIGPIPE, SIG_IGN);
    const char *ignore = getenv("C_PLUGIN_IGNORE_SIGTERM");
    int ignore_term = ignore != NULL && strcmp(ignore, "1") == 0;
    static sigset_t wait_set;
    sigset_t block_set;
    sigemptyset(&wait_set);
    sigemptyset(&block_set);
    sigaddset(&wait_set, SIGINT);
    sigaddset(&block_set, SIGINT);
    sigaddset(&block_set, SIGTERM);
    if (ignore_term)
        signal(SIGTERM, SIG_IGN);
    else
        sigaddset(&wait_set, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &block_set, NULL);
    pthread_t sig_thread;
    if (pthread_create(&sig_thread, NULL, signal_thread, &wait_set) != 0) {
        log_line("cannot start the signal thread");
        return 1;
    }
    pthread_detach(sig_thread);

    /* Noise on stdout: nothing may depend on what a plugin prints. */
    printf("c_plugin: starting (pid %ld)\n", (long)getpid());
    printf("{\"Name\": \"not a pconf\", \"Sock\": [1, 2,, }}} garbage\n");
    printf("HTTP/1.1 200 OK\r\n\r\n");
    fflush(stdout);

    char *abs_dir = absolute_path(dir);
    if (abs_dir == NULL) {
        log_line("cannot make '%s' absolute: %s", dir, strerror(errno));
        return 1;
    }
    const char *sep = strcmp(abs_dir, "/") == 0 ? "" : "/";
    size_t base = strlen(abs_dir) + strlen(ns) + strlen(name) + 32;
    g_sock_path = xmalloc(base);
    g_pconf_path = xmalloc(base);
    char *tmp_path = xmalloc(base + 32);
    snprintf(g_sock_path, base, "%s%s%s%s.sock", abs_dir, sep, ns, name);
    snprintf(g_pconf_path, base, "%s%s%s%s.pconf", abs_dir, sep, ns, name);
    snprintf(tmp_path, base + 32, "%s%s.%s%s.pconf.%ld.tmp", abs_dir, sep, ns, name,
             (long)getpid());

    pthread_mutex_lock(&g_files_lock);
    struct sockaddr_un addr;
    if (strlen(g_sock_path) >= sizeof addr.sun_path)
        die_locked("socket path too long for a Unix socket: %s", g_sock_path);
    make_address(&addr, g_sock_path);
    if (mkdir(abs_dir, 0700) != 0 && errno != EEXIST)
        die_locked("cannot create directory %s: %s", abs_dir, strerror(errno));

    /* A socket file left behind: remove it only if nobody accepts connections on it. */
    struct stat st;
    if (lstat(g_sock_path, &st) == 0) {
        if (!S_ISSOCK(st.st_mode))
            die_locked("%s exists and is not a socket", g_sock_path);
        int probe = socket(AF_UNIX, SOCK_STREAM, 0);
        if (probe < 0)
            die_locked("socket: %s", strerror(errno));
        int r = connect(probe, (struct sockaddr *)&addr, sizeof addr);
        int err = errno;
        close(probe);
        if (r == 0)
            die_locked("another process serves %s already", g_sock_path);
        if (err == ECONNREFUSED) {
            if (unlink(g_sock_path) != 0 && errno != ENOENT)
                die_locked("cannot remove stale socket %s: %s", g_sock_path, strerror(errno));
        } else if (err != ENOENT) {
            die_locked("cannot check existing socket %s: %s", g_sock_path, strerror(err));
        }
    }

    int lfd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (lfd < 0)
        die_locked("socket: %s", strerror(errno));
    fcntl(lfd, F_SETFD, FD_CLOEXEC);
    g_listen_fd = lfd;
    mode_t old_mask = umask(077);
    int bound = bind(lfd, (struct sockaddr *)&addr, sizeof addr);
    int bind_err = errno;
    umask(old_mask);
    if (bound != 0)
        die_locked("cannot bind %s: %s", g_sock_path, strerror(bind_err));
    g_sock_created = 1;
    chmod(g_sock_path, 0600);
    if (listen(lfd, 128) != 0)
        die_locked("cannot listen on %s: %s", g_sock_path, strerror(errno));

    /* The .pconf, written to a temporary file and renamed into place. */
    struct sbuf conf = {0};
    int bad = sbuf_str(&conf, "{\"Name\":\"") ||
              json_escape(&conf, (const unsigned char *)name, strlen(name)) ||
              sbuf_str(&conf, "\",\"NameSpace\":\"") ||
              json_escape(&conf, (const unsigned char *)ns, strlen(ns)) ||
              sbuf_str(&conf, "\",\"Url\":\"unix://") ||
              json_escape(&conf, (const unsigned char *)ns, strlen(ns)) ||
              json_escape(&conf, (const unsigned char *)name, strlen(name)) ||
              sbuf_str(&conf, "\",\"Sock\":\"") ||
              json_escape(&conf, (const unsigned char *)g_sock_path, strlen(g_sock_path)) ||
              sbuf_str(&conf, "\",\"LazyLoad\":false}");
    if (bad)
        die_locked("out of memory");
    unlink(tmp_path);
    int fd = open(tmp_path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0)
        die_locked("cannot create %s: %s", tmp_path, strerror(errno));
    if (fchmod(fd, 0600) != 0 || write_all(fd, conf.data, conf.len) != 0 || close(fd) != 0) {
        int err = errno;
        unlink(tmp_path);
        die_locked("cannot write %s: %s", tmp_path, strerror(err));
    }
    if (rename(tmp_path, g_pconf_path) != 0) {
        int err = errno;
        unlink(tmp_path);
        die_locked("cannot rename to %s: %s", g_pconf_path, strerror(err));
    }
    g_pconf_created = 1;
    free(conf.data);
    free(tmp_path);
    free(abs_dir);
    pthread_mutex_unlock(&g_files_lock);

    printf("ready\n");
    fflush(stdout);

    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    size_t stack = 256 * 1024;
#ifdef PTHREAD_STACK_MIN
    if (stack < (size_t)PTHREAD_STACK_MIN)
        stack = (size_t)PTHREAD_STACK_MIN;
#endif
    pthread_attr_setstacksize(&attr, stack);
    for (;;) {
        int cfd = accept(lfd, NULL, NULL);
        if (cfd < 0) {
            if (errno == EINTR || errno == ECONNABORTED || errno == EPROTO)
                continue;
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                struct timespec ts = {0, 20 * 1000 * 1000};
                nanosleep(&ts, NULL);
                continue;
            }
            pthread_mutex_lock(&g_files_lock);
            die_locked("accept failed: %s", strerror(errno));
        }
        fcntl(cfd, F_SETFD, FD_CLOEXEC);
        struct conn *c = calloc(1, sizeof *c);
        pthread_t thread;
        if (c == NULL) {
            close(cfd);
            continue;
        }
        c->fd = cfd;
        if (pthread_create(&thread, &attr, serve_connection, c) != 0) {
            close(cfd);
            free(c);
        }
    }
}
