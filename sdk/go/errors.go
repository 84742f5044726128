package goplug

import (
	"errors"
	"fmt"
	"time"
)

// Sentinel errors; test with errors.Is.
var (
	// ErrCallbackNotFound: Notify found no application subscribed to the name.
	ErrCallbackNotFound = errors.New("goplug: callback not found")
	// ErrNotifyTimeout: a subscriber's queue stayed full for the notify timeout.
	ErrNotifyTimeout = errors.New("goplug: notify timed out")
	// ErrStopped: the plugin was stopped.
	ErrStopped = errors.New("goplug: plugin stopped")
	// ErrAlreadyRunning: a live process already serves the plugin's socket.
	ErrAlreadyRunning = errors.New("goplug: plugin already running")
	// ErrConfig: an invalid name, directory, method or option.
	ErrConfig = errors.New("goplug: invalid configuration")
)

// CallbackNotFoundError is returned by Notify when no application registered the callback.
// Its text is GoPlug's ("Callback could not be found for: NAME").
type CallbackNotFoundError struct {
	Name string
}

func (e *CallbackNotFoundError) Error() string {
	return "Callback could not be found for: " + e.Name
}

// Is makes errors.Is(err, ErrCallbackNotFound) true.
func (e *CallbackNotFoundError) Is(target error) bool { return target == ErrCallbackNotFound }

// NotifyTimeoutError is returned by Notify when a subscriber did not catch up in time.
type NotifyTimeoutError struct {
	Name     string
	Full     int // subscribers whose queue was full
	MaxQueue int
	Timeout  time.Duration
}

func (e *NotifyTimeoutError) Error() string {
	return fmt.Sprintf("goplug: %d subscriber(s) of %q have %d notifications pending and did not catch up within %v",
		e.Full, e.Name, e.MaxQueue, e.Timeout)
}

// Is makes errors.Is(err, ErrNotifyTimeout) true.
func (e *NotifyTimeoutError) Is(target error) bool { return target == ErrNotifyTimeout }

func configError(format string, args ...interface{}) error {
	return fmt.Errorf("%w: "+format, append([]interface{}{ErrConfig}, args...)...)
}
