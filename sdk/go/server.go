package goplug

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

type connKey struct{}

// listener accepts only peers with an allowed uid (SO_PEERCRED) and at most MaxConnections.
type listener struct {
	*net.UnixListener
	p    *Plugin
	once sync.Once
	err  error
}

func (l *listener) Accept() (net.Conn, error) {
	for {
		c, err := l.UnixListener.AcceptUnix()
		if err != nil {
			return nil, err
		}
		if peerCredSupported {
			uid, ok := peerUID(c)
			if !ok || !l.p.allowed[uid] {
				l.p.log.Printf("%s: refused a connection from uid %d", l.p.Label(), uid)
				c.Close()
				continue
			}
		}
		if l.p.numConns() >= l.p.opts.MaxConnections {
			refuseRaw(c, 503, "ServiceUnavailable", "too many connections")
			continue
		}
		return c, nil
	}
}

func (l *listener) Close() error {
	l.once.Do(func() { l.err = l.UnixListener.Close() })
	return l.err
}

// refuseRaw answers on a connection net/http does not serve, then closes it.
func refuseRaw(c net.Conn, status int, kind, message string) {
	body := errorBody(kind, message, "")
	head := fmt.Sprintf("HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n",
		status, http.StatusText(status), len(body))
	_ = c.SetWriteDeadline(time.Now().Add(time.Second))
	_, _ = c.Write(append([]byte(head), body...))
	c.Close()
}

// send answers status with body framed by Content-Length: no Date, no sniffed Content-Type,
// so a success is exactly "HTTP/1.1 200 OK\r\nContent-Length: N\r\n\r\n<body>".
func send(w http.ResponseWriter, status int, body []byte) {
	h := w.Header()
	h["Date"] = nil
	if _, ok := h["Content-Type"]; !ok {
		h["Content-Type"] = nil
	}
	h.Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

func sendError(w http.ResponseWriter, status int, kind, message, traceback string, closeConn bool) {
	h := w.Header()
	h.Set("Content-Type", "application/json")
	if closeConn {
		h.Set("Connection", "close")
	}
	send(w, status, errorBody(kind, message, traceback))
}

// closeWithoutAnswer ends the connection with no response bytes.
func closeWithoutAnswer(w http.ResponseWriter) {
	if hj, ok := w.(http.Hijacker); ok {
		if c, _, err := hj.Hijack(); err == nil {
			c.Close()
			return
		}
	}
	panic(http.ErrAbortHandler)
}

// readBody reads the whole request body within the limits: false when it answered an error.
func (p *Plugin) readBody(w http.ResponseWriter, r *http.Request) ([]byte, bool) {
	max := p.opts.MaxBody
	conn, _ := r.Context().Value(connKey{}).(net.Conn)
	// After a refusal the rest of the body is not waited for: reads fail at once, and
	// net/http closes the connection after the answer.
	abandon := func() {
		if conn != nil {
			_ = conn.SetReadDeadline(time.Now())
		}
	}
	if r.ContentLength > max {
		abandon()
		sendError(w, http.StatusRequestEntityTooLarge, "ProtocolError",
			fmt.Sprintf("the body (%d bytes) is larger than the limit (%d bytes)", r.ContentLength, max), "", true)
		return nil, false
	}
	if r.ContentLength == 0 {
		return []byte{}, true
	}
	if conn != nil {
		_ = conn.SetReadDeadline(time.Now().Add(p.opts.RequestTimeout))
	}
	var body []byte
	var err error
	if r.ContentLength > 0 {
		body = make([]byte, r.ContentLength)
		_, err = io.ReadFull(r.Body, body)
	} else { // chunked
		body, err = io.ReadAll(io.LimitReader(r.Body, max+1))
		if err == nil && int64(len(body)) > max {
			abandon()
			sendError(w, http.StatusRequestEntityTooLarge, "ProtocolError",
				fmt.Sprintf("the body is larger than the limit (%d bytes)", max), "", true)
			return nil, false
		}
	}
	if err != nil {
		abandon()
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			sendError(w, http.StatusRequestTimeout, "RequestTimeout", "the request took too long", "", true)
		} else {
			sendError(w, http.StatusBadRequest, "ProtocolError", "bad request body: "+err.Error(), "", true)
		}
		return nil, false
	}
	if conn != nil {
		_ = conn.SetReadDeadline(time.Time{}) // a long poll may wait longer
	}
	return body, true
}

func errorType(err error) string {
	if t, ok := err.(interface{ ErrorType() string }); ok {
		return t.ErrorType()
	}
	return strings.TrimPrefix(fmt.Sprintf("%T", err), "*")
}

type panicked struct {
	value interface{}
	stack []byte
}

// call runs fn, turning a panic into a value (http.ErrAbortHandler is passed on).
func call(fn Method, in []byte) (out []byte, err error, pan *panicked) {
	defer func() {
		if v := recover(); v != nil {
			if v == http.ErrAbortHandler {
				panic(v)
			}
			pan = &panicked{v, debug.Stack()}
		}
	}()
	out, err = fn(in)
	return
}

func callLegacy(fn func([]byte) []byte, in []byte) ([]byte, error, *panicked) {
	if fn == nil {
		return nil, nil, nil
	}
	return call(func(b []byte) ([]byte, error) { return fn(b), nil }, in)
}

// answerCall answers the outcome of a method, activator or stopper.
func (p *Plugin) answerCall(w http.ResponseWriter, what string, out []byte, err error, pan *panicked) bool {
	if pan != nil {
		msg := fmt.Sprint(pan.value)
		p.log.Printf("%s: %s panicked: %s\n%s", p.Label(), what, msg, pan.stack)
		sendError(w, http.StatusInternalServerError, "panic", msg, string(pan.stack), false)
		return false
	}
	if err != nil {
		p.log.Printf("%s: %s failed: %v", p.Label(), what, err)
		sendError(w, http.StatusInternalServerError, errorType(err), err.Error(), "", false)
		return false
	}
	return true
}

func (p *Plugin) serveHTTP(w http.ResponseWriter, r *http.Request) {
	lines := 0
	for _, values := range r.Header {
		lines += len(values)
	}
	if r.Host != "" {
		lines++ // net/http takes Host out of the header map
	}
	if lines > p.opts.MaxHeaders {
		sendError(w, http.StatusBadRequest, "ProtocolError",
			fmt.Sprintf("more than %d header lines", p.opts.MaxHeaders), "", true)
		return
	}
	body, ok := p.readBody(w, r)
	if !ok {
		return
	}
	target := r.RequestURI
	if !strings.HasPrefix(target, "/") {
		target = r.URL.EscapedPath()
	}
	route := routeOf(target, p.prefix)
	if m := p.method(route); m != nil {
		out, err, pan := call(m, body)
		if p.answerCall(w, route, out, err, pan) {
			send(w, http.StatusOK, out)
		}
		return
	}
	switch route {
	case routePing:
		send(w, http.StatusOK, body)
	case routeRegisterCallback:
		p.servePoll(w, r, body)
	case routeActivate:
		out, err, pan := callLegacy(p.conf.Activator, body)
		if p.answerCall(w, "the activator", out, err, pan) {
			send(w, http.StatusOK, activationBody(p.Methods(), out))
		}
	case routeStop:
		atomic.AddInt32(&p.stoppers, 1)
		defer func() {
			atomic.AddInt32(&p.stoppers, -1)
			p.signalChange()
		}()
		out, err, pan := callLegacy(p.conf.Stopper, body)
		if p.answerCall(w, "the stopper", out, err, pan) {
			send(w, http.StatusOK, out)
		}
		if f, ok := w.(http.Flusher); ok {
			f.Flush() // on the wire before Stop, if another goroutine runs it now, closes us
		}
	case routeUnsubscribe:
		name, err := parseCallbackName(body)
		if err != nil {
			sendError(w, http.StatusBadRequest, "ProtocolError", err.Error(), "", false)
			return
		}
		p.hub.unsubscribe(r.Header.Get(headerSubscriber), name)
		send(w, http.StatusOK, nil)
	case "":
		sendError(w, http.StatusBadRequest, "ProtocolError", "empty route", "", false)
	default:
		sendError(w, http.StatusNotFound, "MethodNotFound", fmt.Sprintf("no method %q", route), "", false)
	}
}

func (p *Plugin) servePoll(w http.ResponseWriter, r *http.Request, body []byte) {
	name, err := parseCallbackName(body)
	if err != nil {
		sendError(w, http.StatusBadRequest, "ProtocolError", err.Error(), "", false)
		return
	}
	token := r.Header.Get(headerSubscriber)
	if token != "" && !validToken(token) {
		sendError(w, http.StatusBadRequest, "ProtocolError", "invalid "+headerSubscriber, "", false)
		return
	}
	var ack uint64
	if text := r.Header.Get(headerAck); text != "" {
		ack, err = strconv.ParseUint(text, 10, 64)
		if err != nil || strings.TrimLeft(text, "0123456789") != "" {
			sendError(w, http.StatusBadRequest, "ProtocolError", "invalid "+headerAck, "", false)
			return
		}
	}
	b, end := p.hub.poll(token, name, ack, r.Context().Done())
	switch end {
	case pollClosed:
		sendError(w, http.StatusServiceUnavailable, "Stopping", "the plugin is stopping", "", true)
		return
	case pollEnded, pollCancelled:
		// An unsubscribed token never comes back; a peer that went away gets nothing.
		closeWithoutAnswer(w)
		return
	}
	if b.legacy {
		send(w, http.StatusOK, b.items[0])
		return
	}
	size := 0
	for _, item := range b.items {
		size += 4 + len(item)
	}
	out := make([]byte, 0, size)
	for _, item := range b.items {
		out = binary.BigEndian.AppendUint32(out, uint32(len(item)))
		out = append(out, item...)
	}
	h := w.Header()
	h.Set(headerSeq, strconv.FormatUint(b.firstSeq, 10))
	h.Set(headerCount, strconv.Itoa(len(b.items)))
	send(w, http.StatusOK, out)
}
