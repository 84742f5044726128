"""The wire protocol, sans-IO: HTTP framing, the `.pconf` file and the routes.

Nothing in this package touches a socket, a thread or a clock; both the plugin side and the
registry side build on it, and meet only here.
"""
