"""The python-floor-cold-start server: the least a Python process can do to answer a request.

Stdlib only: listen on the Unix socket given as argv[1], print "ready", echo what arrives on the
first connection until it closes, then exit.
"""

import socket
import sys

srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(sys.argv[1])
srv.listen(1)
sys.stdout.write("ready\n")
sys.stdout.flush()
conn, _ = srv.accept()
while True:
    data = conn.recv(65536)
    if not data:
        break
    conn.sendall(data)
