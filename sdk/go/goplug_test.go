package goplug

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

func Upper(in []byte) []byte { return bytes.ToUpper(in) }

func Echo(in []byte) ([]byte, error) { return in, nil }

type typedErr struct{}

func (typedErr) Error() string     { return "it broke" }
func (typedErr) ErrorType() string { return "ValueError" }

var testMethods = map[string]interface{}{
	"main.Echo":  Echo,
	"main.Upper": Upper,
	"main.Fail":  func([]byte) ([]byte, error) { return nil, errors.New("division by zero") },
	"main.Typed": func([]byte) ([]byte, error) { return nil, typedErr{} },
	"main.Panic": func([]byte) []byte { panic("boom") },
	"main.Big":   func([]byte) []byte { return bytes.Repeat([]byte("x"), 5000) },
	"main.Nil":   func([]byte) []byte { return nil },
}

func TestPconfContentsAndModes(t *testing.T) {
	parent := shortDir(t)
	loc := filepath.Join(parent, "new")
	t.Setenv(EnvLaunchToken, "q9Jx3kV0mW7cY2bN8aR5tL1e")
	f := startPlugin(t, PluginImplConf{PluginLoc: loc, Name: "Do", Namespace: "Test"}, Options{}, nil)

	info, err := os.Stat(loc)
	if err != nil || info.Mode().Perm() != 0o700 {
		t.Fatalf("directory mode %v, %v", info.Mode(), err)
	}
	pconfPath := filepath.Join(loc, "Do@Test.pconf")
	data, err := os.ReadFile(pconfPath)
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(loc, "Do@Test.sock")
	want := fmt.Sprintf(`{"Name":"Do","NameSpace":"Test","Url":"unix://TestDo","Sock":%q,"LazyLoad":false,"Pid":%d,"Protocol":"goplug/1","Version":%q,"Launch":"q9Jx3kV0mW7cY2bN8aR5tL1e"}`,
		sock, os.Getpid(), Version)
	if string(data) != want {
		t.Fatalf("pconf\n got %s\nwant %s", data, want)
	}
	if st, _ := os.Stat(pconfPath); st.Mode().Perm() != 0o600 {
		t.Fatalf("pconf mode %v", st.Mode())
	}
	st, err := os.Lstat(sock)
	if err != nil || st.Mode()&os.ModeSocket == 0 || st.Mode().Perm() != 0o600 {
		t.Fatalf("socket %v %v", st, err)
	}
	if f.p.SockPath() != sock || f.p.PconfPath() != pconfPath {
		t.Fatal("paths")
	}
	entries, _ := os.ReadDir(loc)
	if len(entries) != 2 {
		t.Fatalf("leftover files: %v", entries)
	}
}

func TestPconfOptionalFields(t *testing.T) {
	t.Setenv(EnvLaunchToken, "bad token!")
	f := startPlugin(t, PluginImplConf{Name: "Solo", Url: "unix://x/base", LazyLoad: true}, Options{}, nil)
	var conf map[string]interface{}
	data, _ := os.ReadFile(filepath.Join(f.dir, "Solo.pconf"))
	if err := json.Unmarshal(data, &conf); err != nil {
		t.Fatal(err)
	}
	if _, ok := conf["Launch"]; ok {
		t.Fatal("a malformed launch token must not be echoed")
	}
	if conf["NameSpace"] != "" || conf["LazyLoad"] != true || conf["Url"] != "unix://x/base" {
		t.Fatalf("pconf %s", data)
	}
	// Routes are accepted after the Url's path too.
	c := f.dial()
	c.send([]byte("POST /base/Ping HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"))
	if r := c.mustRead(); r.status != 200 || string(r.body) != "hi" {
		t.Fatalf("%+v", r)
	}
}

func TestDefaultURLEncoding(t *testing.T) {
	if got := defaultURL("D o", "T"); got != "unix://TD%20o" {
		t.Fatal(got)
	}
}

func TestGoplugDirAndNames(t *testing.T) {
	dir := shortDir(t)
	t.Setenv(EnvDir, dir)
	p, err := PluginInit(PluginImplConf{Name: "Env"})
	if err != nil {
		t.Fatal(err)
	}
	if p.Location() != dir || p.PconfPath() != filepath.Join(dir, "Env.pconf") {
		t.Fatal(p.Location(), p.PconfPath())
	}
	t.Setenv(EnvDir, "")
	if _, err := PluginInit(PluginImplConf{Name: "Env"}); !errors.Is(err, ErrConfig) {
		t.Fatalf("no directory: %v", err)
	}
	for _, bad := range []PluginImplConf{
		{PluginLoc: dir, Name: ""}, {PluginLoc: dir, Name: "a/b"}, {PluginLoc: dir, Name: "a@b"},
		{PluginLoc: dir, Name: ".."}, {PluginLoc: dir, Name: "a\x00"}, {PluginLoc: dir, Name: "a", Namespace: "x\ny"},
		{PluginLoc: dir, Name: "a", Namespace: "."},
	} {
		if _, err := PluginInit(bad); !errors.Is(err, ErrConfig) {
			t.Errorf("%q/%q accepted: %v", bad.Name, bad.Namespace, err)
		}
	}
}

func TestRegisterMethodNaming(t *testing.T) {
	p, err := PluginInit(PluginImplConf{PluginLoc: shortDir(t), Name: "N"})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.RegisterMethod(Upper); err != nil { // GoPlug's signature
		t.Fatal(err)
	}
	if err := p.RegisterMethod(Echo); err != nil {
		t.Fatal(err)
	}
	pkg := "goplug-go." // the import path's directories are dropped: a route has no '/'
	if FuncName(Upper) != "github.com/goplug/goplug-go.Upper" {
		t.Fatal(FuncName(Upper))
	}
	if got := p.Methods(); len(got) != 2 || got[0] != pkg+"Upper" || got[1] != pkg+"Echo" {
		t.Fatal(got)
	}
	if err := p.RegisterMethod(func(int) {}); !errors.Is(err, ErrConfig) {
		t.Fatal("a wrong signature must be refused")
	}
	if err := p.RegisterMethod(nil); !errors.Is(err, ErrConfig) {
		t.Fatal("nil must be refused")
	}
	for _, name := range []string{"", "a/b", "Ping", "Activate", "Stop", "RegisterCallback", "Unsubscribe"} {
		if err := p.RegisterMethodName(name, Echo); !errors.Is(err, ErrConfig) {
			t.Errorf("method name %q accepted", name)
		}
	}
	type named func([]byte) []byte
	if err := p.RegisterMethodName("Named", named(Upper)); err != nil {
		t.Fatal(err)
	}
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	defer p.Stop()
	if err := p.RegisterMethodName("Late", Echo); err == nil {
		t.Fatal("registering after Start must fail")
	}
	if err := p.Start(); err == nil {
		t.Fatal("a second Start must fail")
	}
}

// The exact bytes of GoPlug's registry requests, and exact answers.
func TestExactBytesAndKeepAlive(t *testing.T) {
	f := startPlugin(t, PluginImplConf{}, Options{}, map[string]interface{}{"main.Do": Upper})
	c := f.dial()
	ping, _ := hex.DecodeString("504f5354202f50696e6720485454502f312e310d0a486f73743a2054657374446f0d0a557365722d4167656e743a20476f2d687474702d636c69656e742f312e310d0a436f6e74656e742d4c656e6774683a20390d0a436f6e74656e742d547970653a206170706c69636174696f6e2f6a736f6e0d0a0d0a546573742044617461")
	activate, _ := hex.DecodeString("504f5354202f416374697661746520485454502f312e310d0a486f73743a2054657374446f0d0a557365722d4167656e743a20476f2d687474702d636c69656e742f312e310d0a436f6e74656e742d4c656e6774683a20300d0a0d0a")
	do, _ := hex.DecodeString("504f5354202f6d61696e2e446f20485454502f312e310d0a486f73743a2054657374446f0d0a557365722d4167656e743a20476f2d687474702d636c69656e742f312e310d0a436f6e74656e742d4c656e6774683a20300d0a0d0a")
	// Pipelined in one write, answered in order on the same connection.
	c.send(append(append(append([]byte{}, activate...), ping...), do...))
	want := "HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n[\"main.Do\"]" +
		"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nTest Data" +
		"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
	if got := string(c.readRaw(len(want))); got != want {
		t.Fatalf("got %q", got)
	}
	// Still open: keep-alive.
	c.send(request("main.Do", []byte("abc"), "Content-Type: application/json\r\n"))
	want = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nABC"
	if got := string(c.readRaw(len(want))); got != want {
		t.Fatalf("got %q", got)
	}
	// Bare-LF request lines and a GET are fine too.
	c.send([]byte("GET /Ping HTTP/1.1\nHost: x\nContent-Length: 1\n\nz"))
	if r := c.mustRead(); r.status != 200 || string(r.body) != "z" {
		t.Fatalf("%+v", r)
	}
}

func TestActivateAndRoutes(t *testing.T) {
	var stopIn []byte
	conf := PluginImplConf{
		Activator: func(in []byte) []byte { return []byte("HELLO") },
		Stopper:   func(in []byte) []byte { stopIn = in; return []byte("stopped") },
	}
	f := startPlugin(t, conf, Options{}, nil)
	c := f.dial()
	if r := c.do("Activate", nil, ""); r.status != 200 || string(r.body) != "[]HELLO" {
		t.Fatalf("%+v %q", r, r.body)
	}
	for _, target := range []string{"/Ping/extra/x?q=1", "/%50ing"} {
		c.send([]byte("POST " + target + " HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nq"))
		if r := c.mustRead(); r.status != 200 || string(r.body) != "q" {
			t.Fatalf("%s: %+v", target, r)
		}
	}
	if r := c.do("ping", []byte("x"), ""); r.status != 404 {
		t.Fatalf("routes are case-sensitive: %+v", r)
	}
	if r := c.do("Stop", []byte("in"), ""); r.status != 200 || string(r.body) != "stopped" || string(stopIn) != "in" {
		t.Fatalf("%+v", r)
	}
	if !f.p.Running() {
		t.Fatal("/Stop does not stop the plugin unless its stopper does")
	}
}

func TestMethodsBodiesAndErrors(t *testing.T) {
	f := startPlugin(t, PluginImplConf{}, Options{}, testMethods)
	c := f.dial()
	binary := bytes.Repeat(func() []byte {
		b := make([]byte, 256)
		for i := range b {
			b[i] = byte(i)
		}
		return b
	}(), 40)
	if r := c.do("main.Echo", binary, ""); r.status != 200 || !bytes.Equal(r.body, binary) || r.header.Get("Content-Type") != "" {
		t.Fatalf("binary echo: %d %v", r.status, r.header)
	}
	big := bytes.Repeat([]byte{0xff, 0}, 1<<20)
	if r := c.do("main.Echo", big, ""); r.status != 200 || !bytes.Equal(r.body, big) {
		t.Fatal("2 MiB echo")
	}
	r := c.do("main.Big", nil, "")
	if r.status != 200 || len(r.body) != 5000 || r.header.Get("Content-Length") != "5000" {
		t.Fatalf("big answers use Content-Length: %v", r.header)
	}
	if r := c.do("main.Nil", []byte("x"), ""); r.status != 200 || len(r.body) != 0 {
		t.Fatal("nil answer")
	}
	// A chunked request body.
	c.send([]byte("POST /main.Upper HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"))
	if r := c.mustRead(); r.status != 200 || string(r.body) != "ABCDE" {
		t.Fatalf("chunked: %+v", r)
	}
	checkError := func(route string, status int, kind, message string) {
		t.Helper()
		r := c.do(route, []byte("x"), "")
		if r.status != status || r.header.Get("Content-Type") != "application/json" {
			t.Fatalf("%s: %d %v %s", route, r.status, r.header, r.body)
		}
		var e map[string]string
		if err := json.Unmarshal(r.body, &e); err != nil {
			t.Fatal(err)
		}
		if e["type"] != kind || !strings.Contains(e["message"], message) {
			t.Fatalf("%s: %s", route, r.body)
		}
	}
	checkError("main.Fail", 500, "errors.errorString", "division by zero")
	checkError("main.Typed", 500, "ValueError", "it broke")
	checkError("main.Panic", 500, "panic", "boom")
	checkError("main.Nope", 404, "MethodNotFound", "main.Nope")
	checkError("", 400, "ProtocolError", "empty route")
	checkError("RegisterCallback", 400, "ProtocolError", "JSON string") // body "x" is not JSON
	// The plugin and the connection survived all of it.
	if r := c.do("Ping", []byte("alive"), ""); string(r.body) != "alive" {
		t.Fatal("not alive")
	}
}

func TestLimits(t *testing.T) {
	f := startPlugin(t, PluginImplConf{}, Options{MaxBody: 100, MaxHeaders: 5, MaxHead: 1024}, testMethods)
	c := f.dial()
	r := c.do("main.Echo", bytes.Repeat([]byte("a"), 101), "")
	if r.status != 413 || !r.close {
		t.Fatalf("%+v", r)
	}
	c.expectClosed(2 * time.Second)

	c = f.dial()
	c.send([]byte("POST /main.Echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n65\r\n" + strings.Repeat("a", 101) + "\r\n0\r\n\r\n"))
	if r := c.mustRead(); r.status != 413 {
		t.Fatalf("chunked over the limit: %+v", r)
	}

	c = f.dial()
	if r := c.do("Ping", nil, "A: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n"); r.status != 400 {
		t.Fatalf("too many headers: %+v", r)
	}
	c = f.dial()
	c.send(request("Ping", nil, "X-Big: "+strings.Repeat("b", 8000)+"\r\n"))
	if r := c.mustRead(); r.status != 431 {
		t.Fatalf("head over the limit: %+v", r)
	}
	c = f.dial()
	if r := c.do("main.Echo", bytes.Repeat([]byte("a"), 100), ""); r.status != 200 {
		t.Fatal("at the limit")
	}
}

func TestSlowBodyTimesOut(t *testing.T) {
	f := startPlugin(t, PluginImplConf{}, Options{RequestTimeout: 200 * time.Millisecond}, testMethods)
	c := f.dial()
	c.send([]byte("POST /main.Echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc"))
	if r := c.mustRead(); r.status != 408 {
		t.Fatalf("%+v", r)
	}
	c.expectClosed(2 * time.Second)
}

func TestLegacyPoll(t *testing.T) {
	f := startPlugin(t, PluginImplConf{}, Options{}, nil)
	if err := f.p.Notify("main.callBack", []byte("early")); !errors.Is(err, ErrCallbackNotFound) ||
		err.Error() != "Callback could not be found for: main.callBack" {
		t.Fatalf("%v", err)
	}
	var nf *CallbackNotFoundError
	if err := f.p.Notify("x", nil); !errors.As(err, &nf) || nf.Name != "x" {
		t.Fatal("typed error")
	}
	c := f.dial()
	c.send(request("RegisterCallback", callbackBody("main.callBack"), "Content-Type: application/json\r\n"))
	waitFor(t, "the subscription", func() bool { return len(f.p.GetCallbacks()) == 1 })
	if got := f.p.GetCallbacks(); got[0] != "main.callBack" {
		t.Fatal(got)
	}
	c.expectNothing(50 * time.Millisecond)
	if err := f.p.Notify("main.callBack", []byte("Test Data")); err != nil {
		t.Fatal(err)
	}
	want := "HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nTest Data"
	if got := string(c.readRaw(len(want))); got != want {
		t.Fatalf("%q", got)
	}
	// Notifications between polls are queued, one per answer, in order.
	for i := 1; i <= 3; i++ {
		if err := f.p.Notify("main.callBack", []byte(fmt.Sprint("N", i))); err != nil {
			t.Fatal(err)
		}
	}
	for i := 1; i <= 3; i++ {
		if r := c.do("RegisterCallback", callbackBody("main.callBack"), ""); string(r.body) != fmt.Sprint("N", i) ||
			r.header.Get("X-Goplug-Seq") != "" {
			t.Fatalf("%+v", r)
		}
	}
	// A Ping on another connection is not delayed by a waiting poll.
	c.send(request("RegisterCallback", callbackBody("main.callBack"), ""))
	if r := f.dial().do("Ping", []byte("p"), ""); string(r.body) != "p" {
		t.Fatal("ping")
	}
}

func TestReliablePollsAckResendAndTwoSubscribers(t *testing.T) {
	f := startPlugin(t, PluginImplConf{}, Options{}, nil)
	a, b := f.dial(), f.dial()
	a.send(request("RegisterCallback", callbackBody("cb"), subscriberHeaders("subA", 0)))
	b.send(request("RegisterCallback", callbackBody("cb"), subscriberHeaders("subB", 0)))
	waitFor(t, "two subscribers", func() bool {
		f.p.hub.mu.Lock()
		defer f.p.hub.mu.Unlock()
		return len(f.p.hub.subs) == 2
	})
	if err := f.p.Notify("cb", []byte("one")); err != nil {
		t.Fatal(err)
	}
	for _, c := range []*client{a, b} {
		r := c.mustRead()
		if r.status != 200 || r.header.Get("X-Goplug-Seq") != "1" || r.header.Get("X-Goplug-Count") != "1" {
			t.Fatalf("%+v", r)
		}
		if got := decodeBatch(t, r.body, 1); got[0] != "one" {
			t.Fatal(got)
		}
	}
	for _, s := range []string{"two", "three", ""} {
		if err := f.p.Notify("cb", []byte(s)); err != nil {
			t.Fatal(err)
		}
	}
	// A polls with ack 1: gets 2..4 in one batch.
	r := a.do("RegisterCallback", callbackBody("cb"), subscriberHeaders("subA", 1))
	if r.header.Get("X-Goplug-Seq") != "2" || r.header.Get("X-Goplug-Count") != "3" {
		t.Fatalf("%v", r.header)
	}
	if got := decodeBatch(t, r.body, 3); got[0] != "two" || got[1] != "three" || got[2] != "" {
		t.Fatal(got)
	}
	// The answer was "lost": polling again with ack 1 sends the same again.
	r = a.do("RegisterCallback", callbackBody("cb"), subscriberHeaders("subA", 1))
	if r.header.Get("X-Goplug-Seq") != "2" || r.header.Get("X-Goplug-Count") != "3" {
		t.Fatalf("resend: %v", r.header)
	}
	// B on a new connection (its old one "cut"), ack 3: gets 4 only.
	b2 := f.dial()
	r = b2.do("RegisterCallback", callbackBody("cb"), subscriberHeaders("subB", 3))
	if r.header.Get("X-Goplug-Seq") != "4" || decodeBatch(t, r.body, 1)[0] != "" {
		t.Fatalf("%v %q", r.header, r.body)
	}
	// Ack everything: the poll waits.
	a.send(request("RegisterCallback", callbackBody("cb"), subscriberHeaders("subA", 4)))
	a.expectNothing(50 * time.Millisecond)
	if err := f.p.Notify("cb", []byte("five")); err != nil {
		t.Fatal(err)
	}
	if r := a.mustRead(); r.header.Get("X-Goplug-Seq") != "5" {
		t.Fatal(r.header)
	}
	// A new subscriber that comes with ack 41 (a restarted plugin) is numbered on from it.
	c := f.dial()
	c.send(request("RegisterCallback", callbackBody("cb"), subscriberHeaders("subC", 41)))
	waitFor(t, "subC", func() bool {
		f.p.hub.mu.Lock()
		defer f.p.hub.mu.Unlock()
		return f.p.hub.subs[subKey{"subC", "cb"}] != nil
	})
	if err := f.p.Notify("cb", []byte("six")); err != nil {
		t.Fatal(err)
	}
	if r := c.mustRead(); r.header.Get("X-Goplug-Seq") != "42" {
		t.Fatal(r.header)
	}
	// Bad headers.
	if r := f.dial().do("RegisterCallback", callbackBody("cb"), "X-Goplug-Subscriber: bad token\r\n"); r.status != 400 {
		t.Fatal(r.status)
	}
	if r := f.dial().do("RegisterCallback", callbackBody("cb"), "X-Goplug-Subscriber: s\r\nX-Goplug-Ack: -1\r\n"); r.status != 400 {
		t.Fatal(r.status)
	}
}

func TestUnsubscribe(t *testing.T) {
	f := startPlugin(t, PluginImplConf{}, Options{}, nil)
	a := f.dial()
	a.send(request("RegisterCallback", callbackBody("cb"), subscriberHeaders("subA", 0)))
	waitFor(t, "subscriber", func() bool { return len(f.p.GetCallbacks()) == 1 })
	r := f.dial().do("Unsubscribe", callbackBody("cb"), subscriberHeaders("subA", 0))
	if r.status != 200 || len(r.body) != 0 {
		t.Fatalf("%+v", r)
	}
	a.expectClosed(2 * time.Second) // the waiting poll ends without an answer
	if got := f.p.GetCallbacks(); len(got) != 0 {
		t.Fatal(got)
	}
	if err := f.p.Notify("cb", nil); !errors.Is(err, ErrCallbackNotFound) {
		t.Fatal(err)
	}
	// A late poll carrying the ended token gets no answer and does not come back.
	late := f.dial()
	late.send(request("RegisterCallback", callbackBody("cb"), subscriberHeaders("subA", 0)))
	late.expectClosed(2 * time.Second)
	if got := f.p.GetCallbacks(); len(got) != 0 {
		t.Fatal(got)
	}
	if r := f.dial().do("Unsubscribe", []byte("nope"), ""); r.status != 400 {
		t.Fatal(r.status)
	}
	// Legacy subscribers are unsubscribed by name.
	l := f.dial()
	l.send(request("RegisterCallback", callbackBody("old"), ""))
	waitFor(t, "legacy", func() bool { return len(f.p.GetCallbacks()) == 1 })
	f.dial().do("Unsubscribe", callbackBody("old"), "")
	l.expectClosed(2 * time.Second)
}

func TestBackPressureAndTimeout(t *testing.T) {
	f := startPlugin(t, PluginImplConf{}, Options{MaxQueue: 2, NotifyTimeout: 150 * time.Millisecond}, nil)
	c := f.dial()
	r := func(ack int) *response {
		return c.do("RegisterCallback", callbackBody("cb"), subscriberHeaders("s1", ack))
	}
	c.send(request("RegisterCallback", callbackBody("cb"), subscriberHeaders("s1", 0)))
	waitFor(t, "subscriber", func() bool { return len(f.p.GetCallbacks()) == 1 })
	f.p.Notify("cb", []byte("1"))
	c.mustRead() // holds 1 (unacknowledged)
	if err := f.p.Notify("cb", []byte("2")); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	err := f.p.Notify("cb", []byte("3"))
	var te *NotifyTimeoutError
	if !errors.Is(err, ErrNotifyTimeout) || !errors.As(err, &te) || time.Since(start) < 140*time.Millisecond {
		t.Fatalf("%v after %v", err, time.Since(start))
	}
	// A blocked notify goes through as soon as the subscriber acknowledges.
	done := make(chan error, 1)
	go func() {
		_, err := f.p.NotifyTimeout("cb", []byte("3"), 5*time.Second)
		done <- err
	}()
	time.Sleep(30 * time.Millisecond)
	select {
	case err := <-done:
		t.Fatalf("notify did not block: %v", err)
	default:
	}
	resp := r(1) // acknowledges 1, gets 2
	if decodeBatch(t, resp.body, 1)[0] != "2" {
		t.Fatal(resp.body)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	resp = r(2)
	if resp.header.Get("X-Goplug-Seq") != "3" || decodeBatch(t, resp.body, 1)[0] != "3" {
		t.Fatal(resp.header)
	}
}

func TestBatchLimits(t *testing.T) {
	f := startPlugin(t, PluginImplConf{}, Options{MaxBatch: 2, MaxBatchBytes: 10}, nil)
	c := f.dial()
	c.send(request("RegisterCallback", callbackBody("cb"), subscriberHeaders("s", 0)))
	waitFor(t, "subscriber", func() bool { return len(f.p.GetCallbacks()) == 1 })
	for _, s := range []string{"aaaa", "bbbb", "cccc", "dddddddd", "eeee"} {
		if err := f.p.Notify("cb", []byte(s)); err != nil {
			t.Fatal(err)
		}
	}
	// At most 2 per answer.
	if r := c.mustRead(); r.header.Get("X-Goplug-Count") != "2" || decodeBatch(t, r.body, 2)[1] != "bbbb" {
		t.Fatal(r.header)
	}
	// At most 10 bytes, but always one.
	r := c.do("RegisterCallback", callbackBody("cb"), subscriberHeaders("s", 2))
	if got := decodeBatch(t, r.body, 1); got[0] != "cccc" || r.header.Get("X-Goplug-Seq") != "3" {
		t.Fatal(got)
	}
	r = c.do("RegisterCallback", callbackBody("cb"), subscriberHeaders("s", 3))
	if got := decodeBatch(t, r.body, 1); got[0] != "dddddddd" {
		t.Fatal(got)
	}
}

func TestSubscriberExpiry(t *testing.T) {
	f := startPlugin(t, PluginImplConf{}, Options{SubscriberExpiry: 100 * time.Millisecond}, nil)
	c := f.dial()
	c.send(request("RegisterCallback", callbackBody("cb"), subscriberHeaders("s", 0)))
	waitFor(t, "subscriber", func() bool { return len(f.p.GetCallbacks()) == 1 })
	f.p.Notify("cb", []byte("x"))
	c.mustRead()
	time.Sleep(50 * time.Millisecond)
	if len(f.p.GetCallbacks()) != 1 {
		t.Fatal("expired too early")
	}
	time.Sleep(120 * time.Millisecond)
	if len(f.p.GetCallbacks()) != 0 {
		t.Fatal("not expired")
	}
}

func TestStopOrderAndNoLeaks(t *testing.T) {
	before := runtime.NumGoroutine()
	dir := shortDir(t)
	p, err := PluginInit(PluginImplConf{PluginLoc: dir, Name: "Do", Namespace: "Test"})
	if err != nil {
		t.Fatal(err)
	}
	p.RegisterMethod(Upper)
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	f := &fixture{t, p, dir}
	poll := f.dial()
	poll.send(request("RegisterCallback", callbackBody("cb"), subscriberHeaders("s", 0)))
	legacy := f.dial()
	legacy.send(request("RegisterCallback", callbackBody("cb2"), ""))
	idle := f.dial()
	idle.do("Ping", []byte("x"), "")
	waitFor(t, "subscribers", func() bool { return len(p.GetCallbacks()) == 2 })

	// A notify blocked on a full queue ends with the plugin.
	stopped := make(chan error, 1)
	if err := p.Stop(); err != nil {
		t.Fatal(err)
	}
	go func() { stopped <- p.Notify("cb", nil) }()
	if err := <-stopped; !errors.Is(err, ErrStopped) {
		t.Fatal(err)
	}
	for _, c := range []*client{poll, legacy} {
		r, err := c.read(2 * time.Second)
		if err != nil || r.status != 503 || !strings.Contains(string(r.body), "Stopping") {
			t.Fatalf("%+v %v", r, err)
		}
	}
	idle.expectClosed(2 * time.Second)
	entries, _ := os.ReadDir(dir)
	if len(entries) != 0 {
		t.Fatalf("left behind: %v", entries)
	}
	if _, err := net.Dial("unix", filepath.Join(dir, "Do@Test.sock")); err == nil {
		t.Fatal("still listening")
	}
	if err := p.Stop(); err != nil {
		t.Fatal("Stop is idempotent")
	}
	if err := p.Start(); err == nil {
		t.Fatal("Start after Stop must fail")
	}
	poll.conn.Close()
	legacy.conn.Close()
	idle.conn.Close()
	waitFor(t, "goroutines to end", func() bool { return runtime.NumGoroutine() <= before })
}

// Stop removes the .pconf before the socket goes: a registry never sees a .pconf whose socket
// is gone.
func TestStopRemovesPconfFirst(t *testing.T) {
	dir := shortDir(t)
	p, _ := PluginInit(PluginImplConf{PluginLoc: dir, Name: "Order"})
	p.Start()
	var observed []string
	var mu sync.Mutex
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			// Socket first: "sock gone, then pconf still there" would be a real violation.
			_, e2 := os.Lstat(filepath.Join(dir, "Order.sock"))
			_, e1 := os.Lstat(filepath.Join(dir, "Order.pconf"))
			mu.Lock()
			observed = append(observed, fmt.Sprint(e1 == nil, e2 == nil))
			mu.Unlock()
			select {
			case <-stop:
				return
			default:
			}
		}
	}()
	time.Sleep(5 * time.Millisecond)
	p.Stop()
	time.Sleep(5 * time.Millisecond)
	close(stop)
	<-done
	for _, o := range observed {
		if o == "true false" {
			t.Fatal(".pconf present while the socket is gone")
		}
	}
}

func TestStopperMayCallStop(t *testing.T) {
	var p *Plugin
	conf := PluginImplConf{PluginLoc: shortDir(t), Name: "Self", Stopper: func([]byte) []byte {
		p.Stop()
		return []byte("bye")
	}}
	p, _ = PluginInit(conf)
	p.Start()
	f := &fixture{t, p, conf.PluginLoc}
	c := f.dial()
	start := time.Now()
	c.send(request("Stop", nil, ""))
	c.read(3 * time.Second) // closed (or answered): either way quickly
	if time.Since(start) > 2*time.Second || p.Running() {
		t.Fatalf("Stop inside the stopper took %v", time.Since(start))
	}
}

func TestStopWaitsForCallsInProgress(t *testing.T) {
	release := make(chan struct{})
	f := startPlugin(t, PluginImplConf{}, Options{}, map[string]interface{}{
		"Slow": func(in []byte) []byte { <-release; return []byte("done") },
	})
	c := f.dial()
	c.send(request("Slow", nil, ""))
	time.Sleep(30 * time.Millisecond)
	stopped := make(chan struct{})
	go func() { f.p.Stop(); close(stopped) }()
	waitFor(t, "the .pconf to go", func() bool {
		_, err := os.Stat(f.p.PconfPath())
		return err != nil
	})
	close(release)
	if r := c.mustRead(); string(r.body) != "done" {
		t.Fatal(r)
	}
	<-stopped
}

func TestStaleSocketReplacedLiveRefused(t *testing.T) {
	dir := shortDir(t)
	sock := filepath.Join(dir, "Do@Test.sock")
	// A stale socket: bound, never listened on / closed without unlinking.
	fd, _ := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err := syscall.Bind(fd, &syscall.SockaddrUnix{Name: sock}); err != nil {
		t.Fatal(err)
	}
	syscall.Close(fd)
	f := startPlugin(t, PluginImplConf{PluginLoc: dir, Name: "Do", Namespace: "Test"}, Options{}, nil)
	if r := f.dial().do("Ping", []byte("x"), ""); r.status != 200 {
		t.Fatal("stale socket not replaced")
	}
	other, _ := PluginInit(PluginImplConf{PluginLoc: dir, Name: "Do", Namespace: "Test"})
	if err := other.Start(); !errors.Is(err, ErrAlreadyRunning) {
		t.Fatalf("live socket: %v", err)
	}
	if r := f.dial().do("Ping", []byte("y"), ""); string(r.body) != "y" {
		t.Fatal("the live plugin was disturbed")
	}
	// Not a socket: refused, left alone.
	os.WriteFile(filepath.Join(dir, "F.sock"), []byte("data"), 0o600)
	p3, _ := PluginInit(PluginImplConf{PluginLoc: dir, Name: "F"})
	if err := p3.Start(); !errors.Is(err, ErrConfig) {
		t.Fatal(err)
	}
}

func TestLongSocketPathFallback(t *testing.T) {
	dir := filepath.Join(shortDir(t), strings.Repeat("d", 100))
	f := startPlugin(t, PluginImplConf{PluginLoc: dir, Name: "Long", Namespace: "Path"}, Options{}, nil)
	sock := f.p.SockPath()
	base := filepath.Join(os.TempDir(), "goplug-"+strconv.Itoa(os.Getuid()))
	if filepath.Dir(sock) != base || len(filepath.Base(sock)) != 24+len(".sock") {
		t.Fatal(sock)
	}
	if st, _ := os.Stat(base); st.Mode().Perm() != 0o700 {
		t.Fatal(st.Mode())
	}
	data, _ := os.ReadFile(filepath.Join(dir, "Long@Path.pconf"))
	if !strings.Contains(string(data), `"Sock":"`+sock+`"`) {
		t.Fatal(string(data))
	}
	if r := f.dial().do("Ping", []byte("x"), ""); r.status != 200 {
		t.Fatal("ping")
	}
	f.p.Stop()
	if _, err := os.Lstat(sock); err == nil {
		t.Fatal("socket left")
	}
}

func TestPeerCredentials(t *testing.T) {
	if !peerCredSupported {
		t.Skip("no SO_PEERCRED here")
	}
	var quiet syncBuffer
	f := startPlugin(t, PluginImplConf{}, Options{AllowedUIDs: []int{os.Getuid() + 12345}, Logger: newLogger(&quiet)}, nil)
	c := f.dial()
	c.conn.Write(request("Ping", []byte("x"), "")) // may fail: the plugin closes at once
	c.expectClosed(2 * time.Second)
	waitFor(t, "the log line", func() bool { return strings.Contains(quiet.String(), "refused") })
	if !strings.Contains(quiet.String(), "refused a connection") {
		t.Fatal(quiet.String())
	}
}

func TestMaxConnections(t *testing.T) {
	f := startPlugin(t, PluginImplConf{}, Options{MaxConnections: 1}, nil)
	first := f.dial()
	first.do("Ping", []byte("x"), "")
	second := f.dial()
	r, err := second.read(2 * time.Second)
	if err != nil || r.status != 503 {
		t.Fatalf("%+v %v", r, err)
	}
}
