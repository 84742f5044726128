// GoPlug's example plugin on goplug: plugin "Do" in namespace "Test".
//
// It is GoPlug 0.1.0's example with the import changed: method main.Do answers its input
// upper-cased (a greeting when the input is empty) and notifies the callback "callBack" (a
// goplug registry's name for a function callBack) or "main.callBack" (GoPlug's) with "Test Data"
// on every call, and once a second while an application has registered it.
//
//	go run ./examples/do ./plugins          # the directory as argument
//	GOPLUG_DIR=./plugins go run ./examples/do
//
// A registry can also start it: registry.launch([binary], name="Do", namespace="Test") sets
// GOPLUG_DIR. It serves until SIGINT or SIGTERM, then removes its .pconf and socket and exits 0.
package main

import (
	"bytes"
	"fmt"
	"log"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	GoPlug "github.com/goplug/goplug-go"
)

var (
	plugin     *GoPlug.Plugin
	tickerOnce sync.Once
	done       = make(chan struct{})
)

func main() {
	location := ""
	if len(os.Args) > 2 || (len(os.Args) == 2 && (os.Args[1] == "-h" || os.Args[1] == "--help")) {
		fmt.Fprintf(os.Stderr, "usage: %s [PLUGIN_DIR]  (default: $GOPLUG_DIR)\n", os.Args[0])
		os.Exit(2)
	}
	if len(os.Args) == 2 {
		location = os.Args[1]
	} else if os.Getenv("GOPLUG_DIR") == "" {
		fmt.Fprintf(os.Stderr, "%s: no plugin directory: give one as argument, or set GOPLUG_DIR\n", os.Args[0])
		os.Exit(2)
	}

	config := GoPlug.PluginImplConf{PluginLoc: location, Name: "Do", Namespace: "Test", Url: "",
		LazyLoad: false, Activator: activate, Stopper: stop}
	var err error
	plugin, err = GoPlug.PluginInit(config)
	if err != nil {
		log.Fatalf("Plugin Init Error: %s", err)
	}
	if err := plugin.RegisterMethod(Do); err != nil {
		log.Fatalf("RegisterMethod: %s", err)
	}
	shutdownChannel := makeShutdownChannel() // before Start: a signal is never missed
	if err := plugin.Start(); err != nil {
		log.Fatalf("Start: %s", err)
	}
	log.Printf("serving Do@Test in %s", plugin.Location())

	// We block on this channel.
	<-shutdownChannel
	close(done)
	if err := plugin.Stop(); err != nil {
		log.Fatalf("Stop: %s", err)
	}
	log.Printf("stopped")
}

func makeShutdownChannel() chan os.Signal {
	signalCatchingChannel := make(chan os.Signal, 1)
	signal.Notify(signalCatchingChannel, syscall.SIGINT, syscall.SIGTERM)
	return signalCatchingChannel
}

func activate(data []byte) []byte {
	log.Printf("Activating Plugin")
	tickerOnce.Do(func() { go tick() })
	return nil
}

func stop(data []byte) []byte {
	// GoPlug's example called plugin.Stop() and os.Exit(0) here, before answering; this one
	// answers, and keeps serving until SIGINT/SIGTERM (a registry that launched it sends one).
	log.Printf("Stopping Plugin (a registry unloaded Do@Test)")
	return nil
}

// Do is served as "main.Do".
func Do(data []byte) []byte {
	sendCallback()
	if len(data) == 0 {
		return []byte("Hello from Do@Test!")
	}
	return bytes.ToUpper(data)
}

// sendCallback notifies every registered callback named callBack (nobody listening is no error).
func sendCallback() {
	for _, name := range plugin.GetCallbacks() {
		if name == "callBack" || strings.HasSuffix(name, ".callBack") {
			if _, err := plugin.NotifyTimeout(name, []byte("Test Data"), time.Second); err != nil {
				log.Printf("notify %s: %s", name, err)
			}
		}
	}
}

func tick() {
	ticker := time.NewTicker(time.Second)
	defer ticker.Stop()
	for {
		select {
		case <-done:
			return
		case <-ticker.C:
			sendCallback()
		}
	}
}
