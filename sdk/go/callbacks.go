package goplug

import (
	"sort"
	"sync"
	"time"
)

// The callback hub: one bounded queue per subscriber, with back-pressure (docs/PROTOCOL.md §5).
//
// A subscriber is one registry handle's interest in one callback name: (token, name) for a
// reliable subscription (X-Goplug-Subscriber), ("", name) for a GoPlug-style legacy poll.
// Notify appends to every subscriber's queue of that name and blocks while one is full; a poll
// answers what is queued after the sequence number it acknowledges. Reliable notifications stay
// queued until acknowledged, so an answer lost on a cut connection is sent again.

const maxEnded = 4096

type subKey struct {
	token string
	name  string
}

type queued struct {
	seq  uint64
	data []byte
}

type subscriber struct {
	key      subKey
	legacy   bool
	queue    []queued
	lastSeq  uint64
	waiting  int
	lastSeen time.Time
}

type batch struct {
	firstSeq uint64
	items    [][]byte
	legacy   bool
}

type pollEnd int

const (
	pollOK        pollEnd = iota
	pollClosed            // the plugin is stopping
	pollEnded             // the subscriber unsubscribed (token never used again) or was replaced
	pollCancelled         // the peer went away
)

type hubSettings struct {
	maxQueue      int
	notifyTimeout time.Duration
	expiry        time.Duration
	maxBatch      int
	maxBatchBytes int
}

type hub struct {
	settings hubSettings
	mu       sync.Mutex
	changed  chan struct{} // closed and replaced on every change: a broadcast
	subs     map[subKey]*subscriber
	ended    map[subKey]struct{}
	endOrder []subKey
	closed   bool
}

func newHub(s hubSettings) *hub {
	return &hub{
		settings: s,
		changed:  make(chan struct{}),
		subs:     make(map[subKey]*subscriber),
		ended:    make(map[subKey]struct{}),
	}
}

// broadcastLocked wakes every waiter; h.mu must be held.
func (h *hub) broadcastLocked() {
	close(h.changed)
	h.changed = make(chan struct{})
}

func (h *hub) expireLocked() {
	now := time.Now()
	for key, sub := range h.subs {
		if sub.waiting == 0 && now.Sub(sub.lastSeen) > h.settings.expiry {
			delete(h.subs, key)
		}
	}
}

func (h *hub) isLiveLocked(sub *subscriber) bool { return h.subs[sub.key] == sub }

// names returns the callback names with at least one live subscriber, sorted.
func (h *hub) names() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.expireLocked()
	seen := make(map[string]bool)
	out := []string{}
	for key := range h.subs {
		if !seen[key.name] {
			seen[key.name] = true
			out = append(out, key.name)
		}
	}
	sort.Strings(out)
	return out
}

// notify queues data for every subscriber of name and returns how many there are.
func (h *hub) notify(name string, data []byte, timeout time.Duration) (int, error) {
	data = append([]byte(nil), data...) // the caller may reuse its slice
	limit := h.settings.maxQueue
	var timer *time.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return 0, ErrStopped
	}
	h.expireLocked()
	var targets []*subscriber
	for key, sub := range h.subs {
		if key.name == name {
			targets = append(targets, sub)
		}
	}
	if len(targets) == 0 {
		return 0, &CallbackNotFoundError{Name: name}
	}
	deadline := time.Now().Add(timeout)
	// Wait until every subscriber has room, then queue for all at once: a timeout never leaves
	// the notification with some subscribers and not others.
	for {
		full := 0
		for _, sub := range targets {
			if len(sub.queue) >= limit && h.isLiveLocked(sub) {
				full++
			}
		}
		if full == 0 {
			break
		}
		remaining := time.Until(deadline)
		if remaining <= 0 {
			return 0, &NotifyTimeoutError{Name: name, Full: full, MaxQueue: limit, Timeout: timeout}
		}
		if timer == nil {
			timer = time.NewTimer(remaining)
		} else {
			timer.Reset(remaining)
		}
		changed := h.changed
		h.mu.Unlock()
		select {
		case <-changed:
			if !timer.Stop() {
				<-timer.C
			}
		case <-timer.C:
		}
		h.mu.Lock()
		if h.closed {
			return 0, ErrStopped
		}
		h.expireLocked()
	}
	for _, sub := range targets {
		if h.isLiveLocked(sub) {
			sub.lastSeq++
			sub.queue = append(sub.queue, queued{sub.lastSeq, data})
		}
	}
	h.broadcastLocked()
	return len(targets), nil
}

// poll waits for notifications for one subscriber. token "" is a GoPlug-style poll: one
// queue per name, one notification per answer, no numbering.
func (h *hub) poll(token, name string, ack uint64, cancelled <-chan struct{}) (batch, pollEnd) {
	key := subKey{token, name}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return batch{}, pollClosed
	}
	if _, gone := h.ended[key]; gone {
		return batch{}, pollEnded
	}
	sub := h.subs[key]
	if sub == nil {
		sub = &subscriber{key: key, legacy: token == ""}
		if !sub.legacy {
			// Number on from what the subscriber already has (it may come back after this
			// plugin restarted or forgot it), so an answer lost now is sent again.
			sub.lastSeq = ack
		}
		h.subs[key] = sub
	}
	sub.waiting++
	defer func() {
		sub.waiting--
		sub.lastSeen = time.Now()
	}()
	if !sub.legacy {
		drop := 0
		for drop < len(sub.queue) && sub.queue[drop].seq <= ack {
			drop++
		}
		if drop > 0 {
			sub.queue = append(sub.queue[:0:0], sub.queue[drop:]...)
		}
	}
	h.broadcastLocked() // room may have appeared for a blocked notify
	for len(sub.queue) == 0 {
		if h.closed {
			return batch{}, pollClosed
		}
		if h.subs[key] != sub {
			return batch{}, pollEnded
		}
		changed := h.changed
		h.mu.Unlock()
		select {
		case <-changed:
			h.mu.Lock()
		case <-cancelled:
			h.mu.Lock()
			if len(sub.queue) == 0 {
				return batch{}, pollCancelled
			}
		}
	}
	if h.closed {
		return batch{}, pollClosed
	}
	if sub.legacy {
		data := sub.queue[0].data
		sub.queue[0] = queued{}
		sub.queue = sub.queue[1:]
		h.broadcastLocked()
		return batch{items: [][]byte{data}, legacy: true}, pollOK
	}
	b := batch{firstSeq: sub.queue[0].seq}
	size := 0
	for _, q := range sub.queue {
		if len(b.items) > 0 && (len(b.items) >= h.settings.maxBatch || size+len(q.data) > h.settings.maxBatchBytes) {
			break
		}
		b.items = append(b.items, q.data)
		size += len(q.data)
	}
	return b, pollOK
}

// unsubscribe forgets a subscriber and its queue; a reliable token is never accepted again.
func (h *hub) unsubscribe(token, name string) bool {
	key := subKey{token, name}
	h.mu.Lock()
	defer h.mu.Unlock()
	_, found := h.subs[key]
	delete(h.subs, key)
	if token != "" {
		if _, already := h.ended[key]; !already {
			h.ended[key] = struct{}{}
			h.endOrder = append(h.endOrder, key)
			if len(h.endOrder) > maxEnded {
				delete(h.ended, h.endOrder[0])
				h.endOrder = append(h.endOrder[:0:0], h.endOrder[1:]...)
			}
		}
	}
	h.broadcastLocked()
	return found
}

// close wakes every waiting poll and notify; later polls end at once.
func (h *hub) close() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.closed = true
	h.broadcastLocked()
}
