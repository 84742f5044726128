package goplug

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"
)

// shortDir is a private directory with a short path (socket paths must stay under 108 bytes).
func shortDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("/tmp", "gpgo")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

type fixture struct {
	t   *testing.T
	p   *Plugin
	dir string
}

func startPlugin(t *testing.T, conf PluginImplConf, opts Options, methods map[string]interface{}) *fixture {
	t.Helper()
	if conf.PluginLoc == "" {
		conf.PluginLoc = shortDir(t)
	}
	if opts.Logger == nil {
		opts.Logger = newLogger(io.Discard)
	}
	if conf.Name == "" {
		conf.Name, conf.Namespace = "Do", "Test"
	}
	p, err := PluginInitWithOptions(conf, opts)
	if err != nil {
		t.Fatal(err)
	}
	for name, fn := range methods {
		if err := p.RegisterMethodName(name, fn); err != nil {
			t.Fatal(err)
		}
	}
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Stop() })
	return &fixture{t, p, conf.PluginLoc}
}

type client struct {
	t    *testing.T
	conn net.Conn
	r    *bufio.Reader
}

func (f *fixture) dial() *client {
	f.t.Helper()
	c, err := net.Dial("unix", f.p.SockPath())
	if err != nil {
		f.t.Fatal(err)
	}
	f.t.Cleanup(func() { c.Close() })
	return &client{f.t, c, bufio.NewReader(c)}
}

// request builds a request like the Go registry's; extra is preformatted header lines.
func request(route string, body []byte, extra string) []byte {
	head := fmt.Sprintf("POST /%s HTTP/1.1\r\nHost: TestDo\r\nUser-Agent: Go-http-client/1.1\r\n%sContent-Length: %d\r\n\r\n",
		route, extra, len(body))
	return append([]byte(head), body...)
}

func (c *client) send(raw []byte) {
	c.t.Helper()
	if _, err := c.conn.Write(raw); err != nil {
		c.t.Fatal(err)
	}
}

type response struct {
	status int
	header http.Header
	body   []byte
	close  bool
}

func (c *client) read(timeout time.Duration) (*response, error) {
	c.conn.SetReadDeadline(time.Now().Add(timeout))
	defer c.conn.SetReadDeadline(time.Time{})
	resp, err := http.ReadResponse(c.r, nil)
	if err != nil {
		return nil, err
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		return nil, err
	}
	return &response{resp.StatusCode, resp.Header, body, resp.Close}, nil
}

func (c *client) mustRead() *response {
	c.t.Helper()
	r, err := c.read(5 * time.Second)
	if err != nil {
		c.t.Fatal(err)
	}
	return r
}

func (c *client) do(route string, body []byte, extra string) *response {
	c.t.Helper()
	c.send(request(route, body, extra))
	return c.mustRead()
}

// readRaw reads exactly n bytes.
func (c *client) readRaw(n int) []byte {
	c.t.Helper()
	buf := make([]byte, n)
	c.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	defer c.conn.SetReadDeadline(time.Time{})
	if _, err := io.ReadFull(c.r, buf); err != nil {
		c.t.Fatalf("read %d bytes: %v (got %q)", n, err, buf)
	}
	return buf
}

// expectClosed asserts the peer closes the connection without sending anything.
func (c *client) expectClosed(timeout time.Duration) {
	c.t.Helper()
	c.conn.SetReadDeadline(time.Now().Add(timeout))
	defer c.conn.SetReadDeadline(time.Time{})
	b, err := c.r.ReadByte()
	if err == nil {
		rest, _ := c.r.Peek(c.r.Buffered())
		c.t.Fatalf("expected the connection to close, got %q", append([]byte{b}, rest...))
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		c.t.Fatal("the connection stayed open")
	}
}

// expectNothing asserts no answer arrives within d (a waiting long poll).
func (c *client) expectNothing(d time.Duration) {
	c.t.Helper()
	c.conn.SetReadDeadline(time.Now().Add(d))
	defer c.conn.SetReadDeadline(time.Time{})
	if _, err := c.r.Peek(1); err == nil {
		c.t.Fatal("unexpected answer")
	} else {
		var ne net.Error
		if !errors.As(err, &ne) || !ne.Timeout() {
			c.t.Fatalf("connection failed: %v", err)
		}
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func callbackBody(name string) []byte { return []byte(`"` + name + `"`) }

func subscriberHeaders(token string, ack int) string {
	return fmt.Sprintf("X-Goplug-Subscriber: %s\r\nX-Goplug-Ack: %d\r\n", token, ack)
}

func decodeBatch(t *testing.T, body []byte, count int) []string {
	t.Helper()
	var out []string
	for i := 0; i < count; i++ {
		if len(body) < 4 {
			t.Fatalf("truncated batch")
		}
		n := int(body[0])<<24 | int(body[1])<<16 | int(body[2])<<8 | int(body[3])
		out = append(out, string(body[4:4+n]))
		body = body[4+n:]
	}
	if len(body) != 0 {
		t.Fatalf("bytes after the batch: %q", body)
	}
	return out
}

func hasPrefixLine(s, prefix string) bool { return strings.HasPrefix(s, prefix) }
