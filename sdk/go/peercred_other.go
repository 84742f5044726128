//go:build !linux

package goplug

import "net"

// peerUID is not implemented here: the socket's 0600 mode is the only access control.
func peerUID(c *net.UnixConn) (int, bool) { return 0, false }

const peerCredSupported = false
