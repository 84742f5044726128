package goplug

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"
)

// seedPlugin is the plugin code of GoPlug 0.1.0's README, verbatim but for the import path:
// positional PluginImplConf, RegisterMethod(Do) with func([]byte) []byte, GetCallbacks,
// Notify, Start, Stop.
const seedPlugin = `package main

import (
	GoPlug "github.com/goplug/goplug-go"
)

func main() {
	config := GoPlug.PluginImplConf{"PluginLoc", "Name", "Namespace", "unix://URL", false, activate, stop}
	plugin, err := GoPlug.PluginInit(config)
	if err != nil {
		return
	}
	plugin.RegisterMethod(Do)
	plugin.Start()
	callbackList := plugin.GetCallbacks()
	for _, callbackName := range callbackList {
		err = plugin.Notify(callbackName, []byte("inputBytes"))
	}
	var impl *GoPlug.PluginImpl = plugin
	impl.Stop()
}

func activate(input []byte) []byte {
	return nil
}

func stop(input []byte) []byte {
	return nil
}

func Do(input []byte) []byte {
	return input
}
`

// A GoPlug plugin switches by changing its import: the seed README's code compiles as is.
func TestSeedReadmeCodeCompiles(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a program")
	}
	goBin := filepath.Join(runtime.GOROOT(), "bin", "go")
	if _, err := os.Stat(goBin); err != nil {
		t.Skip("no go binary in GOROOT")
	}
	here, err := filepath.Abs(".")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	gomod := "module seed\n\ngo 1.19\n\nrequire github.com/goplug/goplug-go v0.0.0\n\nreplace github.com/goplug/goplug-go => " + here + "\n"
	if err := os.WriteFile(filepath.Join(dir, "go.mod"), []byte(gomod), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "main.go"), []byte(seedPlugin), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(goBin, "build", "-o", filepath.Join(dir, "seed"), ".")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "GOPROXY=off", "GOTOOLCHAIN=local", "GOFLAGS=-mod=mod")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("the seed README's plugin does not build: %v\n%s", err, out)
	}
}
