package goplug

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

// Wire constants shared with the Python library (docs/PROTOCOL.md).
const (
	// ProtocolVersion is written as "Protocol" in the .pconf.
	ProtocolVersion = "goplug/1"
	// Version of this library, written as "Version" in the .pconf.
	Version = "0.1.0"

	// EnvDir names the plugin directory a launching registry passes.
	EnvDir = "GOPLUG_DIR"
	// EnvLaunchToken is the token a launching registry expects back as "Launch".
	EnvLaunchToken = "GOPLUG_LAUNCH_TOKEN"

	routeActivate         = "Activate"
	routePing             = "Ping"
	routeRegisterCallback = "RegisterCallback"
	routeUnsubscribe      = "Unsubscribe"
	routeStop             = "Stop"

	headerSubscriber = "X-Goplug-Subscriber"
	headerAck        = "X-Goplug-Ack"
	headerSeq        = "X-Goplug-Seq"
	headerCount      = "X-Goplug-Count"
)

var reserved = map[string]bool{
	routeActivate: true, routePing: true, routeRegisterCallback: true, routeUnsubscribe: true, routeStop: true,
}

// checkName refuses names that cannot be file names or that contain '@' (the separator).
func checkName(value, what string) error {
	for _, r := range value {
		if r < 0x20 || r == 0x7f {
			return configError("invalid %s %q: no control characters", what, value)
		}
	}
	if strings.Contains(value, "/") || value == "." || value == ".." {
		return configError("invalid %s %q: no '/', '.' or '..'", what, value)
	}
	if strings.Contains(value, "@") {
		return configError("invalid %s %q: '@' separates name and namespace", what, value)
	}
	if what == "name" && value == "" {
		return configError("the plugin name must not be empty")
	}
	return nil
}

func fileStem(name, namespace string) string {
	if namespace == "" {
		return name
	}
	return name + "@" + namespace
}

const urlSafe = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@"

// defaultURL is GoPlug's default Url, unix://<NameSpace><Name>, with characters a URL host
// cannot hold %-encoded.
func defaultURL(name, namespace string) string {
	var b strings.Builder
	b.WriteString("unix://")
	for _, c := range []byte(namespace + name) {
		if strings.IndexByte(urlSafe, c) >= 0 {
			b.WriteByte(c)
		} else {
			fmt.Fprintf(&b, "%%%02X", c)
		}
	}
	return b.String()
}

// urlPrefix is the path of the Url ("" or "/base"): routes may follow it.
func urlPrefix(u string) string {
	rest := u
	if i := strings.Index(u, "://"); i >= 0 {
		rest = u[i+3:]
	}
	i := strings.IndexByte(rest, '/')
	if i < 0 {
		return ""
	}
	p := strings.TrimRight(rest[i+1:], "/")
	if p == "" {
		return ""
	}
	return "/" + p
}

// routeOf returns the route a request target selects: its first path segment, %-decoded.
func routeOf(target, prefix string) string {
	path := target
	if i := strings.IndexByte(path, '?'); i >= 0 {
		path = path[:i]
	}
	if prefix != "" && strings.HasPrefix(path, prefix+"/") {
		path = path[len(prefix):]
	}
	path = strings.TrimPrefix(path, "/")
	if i := strings.IndexByte(path, '/'); i >= 0 {
		path = path[:i]
	}
	if strings.IndexByte(path, '%') < 0 {
		return path
	}
	if decoded, err := url.PathUnescape(path); err == nil {
		return decoded
	}
	return path
}

func validToken(token string) bool {
	if token == "" || len(token) > 64 {
		return false
	}
	for i := 0; i < len(token); i++ {
		c := token[i]
		ok := c >= 'A' && c <= 'Z' || c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_'
		if !ok {
			return false
		}
	}
	return true
}

func launchToken() string {
	token := os.Getenv(EnvLaunchToken)
	if validToken(token) {
		return token
	}
	return ""
}

// pconf is the announce file, keys in GoPlug's order, then the goplug/1 extensions.
type pconf struct {
	Name      string `json:"Name"`
	NameSpace string `json:"NameSpace"`
	Url       string `json:"Url"`
	Sock      string `json:"Sock"`
	LazyLoad  bool   `json:"LazyLoad"`
	Pid       int    `json:"Pid"`
	Protocol  string `json:"Protocol"`
	Version   string `json:"Version"`
	Launch    string `json:"Launch,omitempty"`
}

func (c pconf) encode() ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(c); err != nil {
		return nil, err
	}
	return bytes.TrimRight(buf.Bytes(), "\n"), nil // compact, no newline, like GoPlug
}

var tempCounter uint64

// writeAtomically writes data through a temporary file renamed into place (mode 0600). The
// temporary name starts with a dot and does not end with the extension, so a watching
// registry never reads a partial file.
func writeAtomically(path string, data []byte) error {
	dir, base := filepath.Split(path)
	tmp := filepath.Join(dir, fmt.Sprintf(".%s.%d.%d.tmp", base, os.Getpid(), atomic.AddUint64(&tempCounter, 1)))
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return err
	}
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if err := f.Chmod(0o600); err != nil { // whatever the umask
		return err
	}
	if _, err := f.Write(data); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		ok = true
		return err
	}
	ok = true
	return nil
}

// maxUnixPath is the longest socket path the OS takes (sun_path minus the NUL).
func maxUnixPath() int {
	if runtime.GOOS == "linux" {
		return 107
	}
	return 103
}

// socketPathFor returns wanted if it fits a socket address, else the short private path
// $TMPDIR/goplug-<uid>/<sha256 of wanted, 24 hex digits>.sock (directory 0700, owned by us).
func socketPathFor(wanted string) (string, error) {
	if len(wanted) <= maxUnixPath() {
		return wanted, nil
	}
	base := filepath.Join(os.TempDir(), fmt.Sprintf("goplug-%d", os.Getuid()))
	if err := os.MkdirAll(base, 0o700); err != nil {
		return "", err
	}
	info, err := os.Lstat(base)
	if err != nil {
		return "", err
	}
	st, _ := info.Sys().(*syscall.Stat_t)
	if !info.IsDir() || info.Mode().Perm()&0o077 != 0 || (st != nil && int(st.Uid) != os.Getuid()) {
		return "", configError("%s must be a directory owned by uid %d with mode 0700", base, os.Getuid())
	}
	sum := sha256.Sum256([]byte(wanted))
	return filepath.Join(base, hex.EncodeToString(sum[:])[:24]+".sock"), nil
}

func isListening(path string) bool {
	c, err := net.DialTimeout("unix", path, time.Second)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

// listenUnix listens at path, taking over a stale socket file but never a live one. The socket
// is made 0600 between bind and listen, so nobody can connect while it is more open.
func listenUnix(path string, backlog int) (*net.UnixListener, error) {
	if info, err := os.Lstat(path); err == nil {
		if info.Mode()&os.ModeSocket == 0 {
			return nil, configError("%s exists and is not a socket; refusing to replace it", path)
		}
		if isListening(path) {
			return nil, fmt.Errorf("%w: a live plugin already listens on %s", ErrAlreadyRunning, path)
		}
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, err
		}
	}
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err != nil {
		return nil, os.NewSyscallError("socket", err)
	}
	syscall.CloseOnExec(fd)
	closeFd := true
	defer func() {
		if closeFd {
			syscall.Close(fd)
		}
	}()
	if err := syscall.Bind(fd, &syscall.SockaddrUnix{Name: path}); err != nil {
		if err == syscall.EADDRINUSE {
			return nil, fmt.Errorf("%w: %s is already in use", ErrAlreadyRunning, path)
		}
		return nil, fmt.Errorf("cannot listen on %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		os.Remove(path)
		return nil, err
	}
	if err := syscall.Listen(fd, backlog); err != nil {
		os.Remove(path)
		return nil, fmt.Errorf("cannot listen on %s: %w", path, err)
	}
	f := os.NewFile(uintptr(fd), path)
	closeFd = false
	ln, err := net.FileListener(f) // duplicates the descriptor
	f.Close()
	if err != nil {
		os.Remove(path)
		return nil, err
	}
	ul, ok := ln.(*net.UnixListener)
	if !ok {
		ln.Close()
		os.Remove(path)
		return nil, fmt.Errorf("cannot listen on %s: not a Unix listener", path)
	}
	ul.SetUnlinkOnClose(false) // Stop removes the file itself, in its order
	return ul, nil
}

// errorBody is the JSON body of a failure: {"type","message","traceback"}.
func errorBody(kind, message, traceback string) []byte {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(struct {
		Type      string `json:"type"`
		Message   string `json:"message"`
		Traceback string `json:"traceback"`
	}{kind, message, traceback})
	return bytes.TrimRight(buf.Bytes(), "\n")
}

// activationBody is the /Activate answer: a JSON array of the method names, then the
// activator's bytes.
func activationBody(methods []string, extra []byte) []byte {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if methods == nil {
		methods = []string{}
	}
	_ = enc.Encode(methods)
	return append(bytes.TrimRight(buf.Bytes(), "\n"), extra...)
}

// parseCallbackName decodes the JSON string /RegisterCallback and /Unsubscribe carry.
func parseCallbackName(body []byte) (string, error) {
	var name *string
	if err := json.Unmarshal(body, &name); err != nil || name == nil || *name == "" {
		return "", errors.New("the callback name must be a non-empty JSON string")
	}
	return *name, nil
}
