// A plugin with the methods the conformance suite exercises: Echo, Upper, Fail, Sleep, Notify.
//
//	goplug conformance -- go run ./examples/echo
//
// It announces itself as Echo@Go in $GOPLUG_DIR (or the directory given as argument) and serves
// until SIGINT or SIGTERM.
package main

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"time"

	goplug "github.com/goplug/goplug-go"
)

func main() {
	location := ""
	if len(os.Args) > 1 {
		location = os.Args[1]
	}
	plugin, err := goplug.PluginInit(goplug.PluginImplConf{PluginLoc: location, Name: "Echo", Namespace: "Go"})
	if err != nil {
		fmt.Fprintf(os.Stderr, "echo: %s\n", err)
		os.Exit(2)
	}
	methods := map[string]goplug.Method{
		"Echo":  func(data []byte) ([]byte, error) { return data, nil },
		"Upper": func(data []byte) ([]byte, error) { return bytes.ToUpper(data), nil },
		"Fail":  func(data []byte) ([]byte, error) { return nil, errors.New("deliberate failure") },
		"Sleep": func(data []byte) ([]byte, error) {
			seconds, err := strconv.ParseFloat(string(data), 64)
			if err != nil {
				return nil, err
			}
			time.Sleep(time.Duration(seconds * float64(time.Second)))
			return []byte("slept"), nil
		},
		// "NAME\nDATA": notify NAME with DATA; answers the number of subscribers.
		"Notify": func(data []byte) ([]byte, error) {
			name, payload, _ := bytes.Cut(data, []byte("\n"))
			count, err := plugin.NotifyTimeout(string(name), payload, 10*time.Second)
			if err != nil {
				return nil, err
			}
			return []byte(strconv.Itoa(count)), nil
		},
	}
	for name, fn := range methods {
		if err := plugin.RegisterMethodName(name, fn); err != nil {
			fmt.Fprintf(os.Stderr, "echo: %s\n", err)
			os.Exit(2)
		}
	}
	if err := plugin.ServeForever(); err != nil {
		fmt.Fprintf(os.Stderr, "echo: %s\n", err)
		os.Exit(1)
	}
}
