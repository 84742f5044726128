// Package goplug is the plugin side of goplug for Go: a plugin is its own process that serves
// HTTP/1.1 on a Unix socket and announces itself with a JSON .pconf file, so that any goplug
// registry (Python) or GoPlug 0.1.0 registry (Go) discovers, loads and calls it.
//
// The API has the shape of GoPlug 0.1.0 (github.com/swarvanusg/GoPlug): a GoPlug plugin
// switches by changing its import. The wire format is docs/PROTOCOL.md of the goplug
// repository (GoPlug 0.1.0's, plus the goplug/1 extensions).
package goplug

import (
	"context"
	"errors"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"reflect"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// PluginImplConf configures a plugin; the fields are GoPlug 0.1.0's, in its order, so GoPlug's
// positional literal PluginImplConf{"PluginLoc", "Name", "Namespace", "unix://URL", false,
// activate, stop} compiles unchanged.
type PluginImplConf struct {
	// PluginLoc is the plugin directory, the one the registry watches. Empty: $GOPLUG_DIR
	// (set by a registry that launches the plugin). Relative paths are taken from the
	// working directory; absolute ones are used as they are.
	PluginLoc string
	// Name of the plugin (required; no '/', '@', control characters, '.' or '..').
	Name string
	// Namespace of the plugin (optional; same rules, may be empty).
	Namespace string
	// Url written in the .pconf; default unix://<Namespace><Name>. Its path, if any, is
	// accepted in front of every route.
	Url string
	// LazyLoad asks registries to load the plugin only when told to.
	LazyLoad bool
	// Activator runs on /Activate; its output is appended to the method list. May be nil.
	Activator func([]byte) []byte
	// Stopper runs on /Stop; its output is the answer. May be nil.
	Stopper func([]byte) []byte
}

// Method is the signature of a plugin method that can fail: an error is answered as
// 500 with a JSON body {"type","message","traceback"}.
type Method = func([]byte) ([]byte, error)

// LegacyMethod is GoPlug 0.1.0's method signature; RegisterMethod accepts it too.
type LegacyMethod = func([]byte) []byte

// Options are limits, timeouts and access control; zero fields take the defaults.
type Options struct {
	MaxHead          int           // request line + headers, bytes (64 KiB); more: 431
	MaxHeaders       int           // header lines (100); more: 400
	MaxBody          int64         // request body, bytes (64 MiB); more: 413 and close
	RequestTimeout   time.Duration // head and body must arrive within it (10 s)
	IdleTimeout      time.Duration // idle keep-alive connections are closed after it (300 s)
	MaxConnections   int           // more connections get 503 (1024)
	AllowedUIDs      []int         // peers allowed to connect (nil: only our own uid)
	MaxQueue         int           // notifications held per subscriber (10 000)
	NotifyTimeout    time.Duration // how long Notify waits for room (10 s)
	SubscriberExpiry time.Duration // a subscriber with no poll for this long is forgotten (60 s)
	MaxBatch         int           // most notifications in one poll answer (1024)
	MaxBatchBytes    int           // most bytes in one poll answer, one always sent (4 MiB)
	StopGrace        time.Duration // how long Stop waits for requests in progress (5 s)
	ConfExt          string        // extension of the announce file (".pconf")
	Backlog          int           // listen backlog (1024)
	Logger           *log.Logger   // nil: standard error, prefix "goplug: "
}

func (o Options) withDefaults() Options {
	if o.MaxHead <= 0 {
		o.MaxHead = 64 * 1024
	}
	if o.MaxHeaders <= 0 {
		o.MaxHeaders = 100
	}
	if o.MaxBody <= 0 {
		o.MaxBody = 64 * 1024 * 1024
	}
	if o.RequestTimeout <= 0 {
		o.RequestTimeout = 10 * time.Second
	}
	if o.IdleTimeout <= 0 {
		o.IdleTimeout = 300 * time.Second
	}
	if o.MaxConnections <= 0 {
		o.MaxConnections = 1024
	}
	if o.MaxQueue <= 0 {
		o.MaxQueue = 10000
	}
	if o.NotifyTimeout <= 0 {
		o.NotifyTimeout = 10 * time.Second
	}
	if o.SubscriberExpiry <= 0 {
		o.SubscriberExpiry = 60 * time.Second
	}
	if o.MaxBatch <= 0 {
		o.MaxBatch = 1024
	}
	if o.MaxBatchBytes <= 0 {
		o.MaxBatchBytes = 4 * 1024 * 1024
	}
	if o.StopGrace <= 0 {
		o.StopGrace = 5 * time.Second
	}
	if o.ConfExt == "" {
		o.ConfExt = ".pconf"
	}
	if o.Backlog <= 0 {
		o.Backlog = 1024
	}
	if o.Logger == nil {
		o.Logger = log.New(os.Stderr, "goplug: ", log.LstdFlags)
	}
	return o
}

const (
	phaseNew = iota
	phaseRunning
	phaseStopped
)

// Plugin is a plugin: methods served on a Unix socket, announced by a .pconf file.
type Plugin struct {
	conf      PluginImplConf
	opts      Options
	location  string
	url       string
	prefix    string
	pconfPath string
	sockPath  string
	allowed   map[int]bool
	log       *log.Logger
	hub       *hub

	mu      sync.Mutex // phase, methods
	phase   int
	methods map[string]Method
	order   []string

	srv       *http.Server
	ln        *listener
	serveDone chan struct{}

	connMu   sync.Mutex
	conns    map[net.Conn]http.ConnState
	active   int
	stoppers int32         // /Stop handlers running their stopper
	changed  chan struct{} // a connection changed state (buffered 1)
}

// PluginImpl is GoPlug 0.1.0's name for Plugin.
type PluginImpl = Plugin

// PluginInit validates conf and returns a plugin to register methods on and start.
func PluginInit(conf PluginImplConf) (*Plugin, error) {
	return PluginInitWithOptions(conf, Options{})
}

// PluginInitWithOptions is PluginInit with limits and timeouts other than the defaults.
func PluginInitWithOptions(conf PluginImplConf, opts Options) (*Plugin, error) {
	if err := checkName(conf.Name, "name"); err != nil {
		return nil, err
	}
	if err := checkName(conf.Namespace, "namespace"); err != nil {
		return nil, err
	}
	location := conf.PluginLoc
	if location == "" {
		location = os.Getenv(EnvDir)
		if location == "" {
			return nil, configError("plugin %s: no plugin directory; pass PluginLoc, or set %s (a registry's launch() sets it)",
				fileStem(conf.Name, conf.Namespace), EnvDir)
		}
	}
	abs, err := filepath.Abs(location)
	if err != nil {
		return nil, err
	}
	opts = opts.withDefaults()
	p := &Plugin{
		conf:     conf,
		opts:     opts,
		location: abs,
		url:      conf.Url,
		log:      opts.Logger,
		methods:  make(map[string]Method),
		conns:    make(map[net.Conn]http.ConnState),
		changed:  make(chan struct{}, 1),
		allowed:  make(map[int]bool),
	}
	if p.url == "" {
		p.url = defaultURL(conf.Name, conf.Namespace)
	}
	p.prefix = urlPrefix(p.url)
	if opts.AllowedUIDs == nil {
		p.allowed[os.Getuid()] = true
	}
	for _, uid := range opts.AllowedUIDs {
		p.allowed[uid] = true
	}
	p.pconfPath = filepath.Join(abs, fileStem(conf.Name, conf.Namespace)+opts.ConfExt)
	p.hub = newHub(hubSettings{
		maxQueue:      opts.MaxQueue,
		notifyTimeout: opts.NotifyTimeout,
		expiry:        opts.SubscriberExpiry,
		maxBatch:      opts.MaxBatch,
		maxBatchBytes: opts.MaxBatchBytes,
	})
	return p, nil
}

// FuncName is the name RegisterMethod gives fn: its Go runtime name, e.g. "main.Do"
// (GoPlug's naming; a closure is e.g. "main.main.func1").
func FuncName(fn interface{}) string {
	v := reflect.ValueOf(fn)
	if v.Kind() != reflect.Func || v.IsNil() {
		return ""
	}
	f := runtime.FuncForPC(v.Pointer())
	if f == nil {
		return ""
	}
	return f.Name()
}

var (
	methodType       = reflect.TypeOf(Method(nil))
	legacyMethodType = reflect.TypeOf(LegacyMethod(nil))
)

func asMethod(fn interface{}) (Method, error) {
	switch f := fn.(type) {
	case nil:
		return nil, configError("method is nil")
	case func([]byte) ([]byte, error):
		if f != nil {
			return f, nil
		}
	case func([]byte) []byte:
		if f != nil {
			return func(in []byte) ([]byte, error) { return f(in), nil }, nil
		}
	default:
		v := reflect.ValueOf(fn)
		if v.Kind() == reflect.Func && !v.IsNil() {
			if v.Type().ConvertibleTo(methodType) {
				return v.Convert(methodType).Interface().(Method), nil
			}
			if v.Type().ConvertibleTo(legacyMethodType) {
				g := v.Convert(legacyMethodType).Interface().(LegacyMethod)
				return func(in []byte) ([]byte, error) { return g(in), nil }, nil
			}
		}
		return nil, configError("a method must be func([]byte) ([]byte, error) or func([]byte) []byte, not %T", fn)
	}
	return nil, configError("method is nil")
}

// RegisterMethod serves fn under its Go runtime name (e.g. "main.Do"), as GoPlug does. fn is
// a func([]byte) ([]byte, error) or GoPlug's func([]byte) []byte. Register before Start.
//
// A function outside package main has its import path in its runtime name
// ("github.com/you/pkg.Fn"); a route cannot hold '/', so the directories are dropped
// ("pkg.Fn"). GoPlug kept them, which made such methods unreachable.
func (p *Plugin) RegisterMethod(fn interface{}) error {
	name := FuncName(fn)
	if i := strings.LastIndexByte(name, '/'); i >= 0 {
		name = name[i+1:]
	}
	return p.RegisterMethodName(name, fn)
}

// RegisterMethodName serves fn (see RegisterMethod) under the given name.
func (p *Plugin) RegisterMethodName(name string, fn interface{}) error {
	m, err := asMethod(fn)
	if err != nil {
		return err
	}
	if name == "" || strings.Contains(name, "/") || reserved[name] {
		return configError("invalid method name %q", name)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.phase != phaseNew {
		return fmt.Errorf("goplug: register methods before Start(): registries read them at load time")
	}
	if _, dup := p.methods[name]; !dup {
		p.order = append(p.order, name)
	}
	p.methods[name] = m
	return nil
}

// Methods returns the registered method names, in registration order.
func (p *Plugin) Methods() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.order...)
}

func (p *Plugin) method(name string) Method {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.methods[name]
}

// GetCallbacks returns the callback names applications have registered (sorted).
func (p *Plugin) GetCallbacks() []string { return p.hub.names() }

// Notify sends data to every application that registered the callback name. It returns a
// *CallbackNotFoundError (errors.Is ErrCallbackNotFound) when there is none, and blocks while a
// subscriber's queue is full, returning a *NotifyTimeoutError (errors.Is ErrNotifyTimeout) after
// the notify timeout. Notifications are never dropped silently.
func (p *Plugin) Notify(name string, data []byte) error {
	_, err := p.hub.notify(name, data, p.opts.NotifyTimeout)
	return err
}

// NotifyTimeout is Notify with its own timeout; it returns the number of subscribers.
func (p *Plugin) NotifyTimeout(name string, data []byte, timeout time.Duration) (int, error) {
	return p.hub.notify(name, data, timeout)
}

// Label is "Name@Namespace" (or "Name").
func (p *Plugin) Label() string { return fileStem(p.conf.Name, p.conf.Namespace) }

// Location is the absolute plugin directory.
func (p *Plugin) Location() string { return p.location }

// PconfPath is the announce file's path.
func (p *Plugin) PconfPath() string { return p.pconfPath }

// SockPath is the socket's path (set by Start; may be a short private path, see PROTOCOL.md).
func (p *Plugin) SockPath() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.sockPath
}

// Running tells whether the plugin is between Start and Stop.
func (p *Plugin) Running() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.phase == phaseRunning
}

// Start listens on the socket, then writes the .pconf so registries discover the plugin.
func (p *Plugin) Start() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.phase != phaseNew {
		return fmt.Errorf("goplug: plugin %s was already started", p.Label())
	}
	if _, err := os.Stat(p.location); errors.Is(err, os.ErrNotExist) {
		if err := os.MkdirAll(p.location, 0o700); err != nil {
			return err
		}
	}
	sock, err := socketPathFor(filepath.Join(p.location, fileStem(p.conf.Name, p.conf.Namespace)+".sock"))
	if err != nil {
		return err
	}
	ul, err := listenUnix(sock, p.opts.Backlog)
	if err != nil {
		return err
	}
	p.sockPath = sock
	p.ln = &listener{UnixListener: ul, p: p}
	p.srv = &http.Server{
		Handler:           http.HandlerFunc(p.serveHTTP),
		ReadHeaderTimeout: p.opts.RequestTimeout,
		IdleTimeout:       p.opts.IdleTimeout,
		MaxHeaderBytes:    p.opts.MaxHead,
		ErrorLog:          p.log,
		ConnState:         p.connState,
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			return context.WithValue(ctx, connKey{}, c)
		},
	}
	p.serveDone = make(chan struct{})
	srv, ln, done := p.srv, p.ln, p.serveDone
	go func() {
		defer close(done)
		_ = srv.Serve(ln)
	}()
	// Running from here on: a registry may activate the plugin as soon as the file appears.
	p.phase = phaseRunning
	data, err := pconf{
		Name:      p.conf.Name,
		NameSpace: p.conf.Namespace,
		Url:       p.url,
		Sock:      sock,
		LazyLoad:  p.conf.LazyLoad,
		Pid:       os.Getpid(),
		Protocol:  ProtocolVersion,
		Version:   Version,
		Launch:    launchToken(),
	}.encode()
	if err == nil {
		err = writeAtomically(p.pconfPath, data)
	}
	if err != nil {
		p.phase = phaseNew
		p.hub.close()
		srv.Close()
		<-done
		os.Remove(sock)
		p.hub = newHub(p.hub.settings)
		return err
	}
	return nil
}

// Stop withdraws the plugin: it removes the .pconf first, answers 503 to waiting callback
// polls, closes the listener and removes the socket file, then lets requests in progress
// finish (at most StopGrace) and closes every connection. It may be called from a stopper (as
// GoPlug's example does); the /Stop connection is then closed without an answer, which
// registries take as a completed unload. Stop is idempotent.
func (p *Plugin) Stop() error {
	p.mu.Lock()
	if p.phase != phaseRunning {
		p.phase = phaseStopped
		p.mu.Unlock()
		return nil
	}
	p.phase = phaseStopped
	srv, ln, done, sock := p.srv, p.ln, p.serveDone, p.sockPath
	p.mu.Unlock()

	var errs []error
	if err := os.Remove(p.pconfPath); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	p.hub.close()
	ln.Close()
	if err := os.Remove(sock); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), p.opts.StopGrace)
	defer cancel()
	go func() {
		// Stop waiting early when only stoppers are still running (a stopper may be the
		// caller of Stop: waiting for it would wait for ever).
		for !p.onlyStoppersLeft() {
			select {
			case <-p.changed:
			case <-ctx.Done():
				return
			}
		}
		cancel()
	}()
	_ = srv.Shutdown(ctx) // closes idle connections, waits for busy ones
	_ = srv.Close()
	<-done
	if len(errs) > 0 {
		return errs[0]
	}
	return nil
}

func (p *Plugin) onlyStoppersLeft() bool {
	p.connMu.Lock()
	defer p.connMu.Unlock()
	return p.active <= int(atomic.LoadInt32(&p.stoppers))
}

func (p *Plugin) signalChange() {
	select {
	case p.changed <- struct{}{}:
	default:
	}
}

func (p *Plugin) connState(c net.Conn, s http.ConnState) {
	p.connMu.Lock()
	prev, had := p.conns[c]
	if had && prev == http.StateActive {
		p.active--
	}
	switch s {
	case http.StateClosed, http.StateHijacked:
		delete(p.conns, c)
	default:
		p.conns[c] = s
		if s == http.StateActive {
			p.active++
		}
	}
	p.connMu.Unlock()
	p.signalChange()
}

func (p *Plugin) numConns() int {
	p.connMu.Lock()
	defer p.connMu.Unlock()
	return len(p.conns)
}

// ServeForever starts the plugin (if needed), blocks until SIGINT or SIGTERM, then stops it.
func (p *Plugin) ServeForever() error {
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(signals)
	if !p.Running() {
		if err := p.Start(); err != nil {
			return err
		}
	}
	<-signals
	return p.Stop()
}
