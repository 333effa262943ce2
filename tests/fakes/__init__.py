"""Stand-ins for what a host talks to that the tests cannot use for real: a provider that
counts its connections, a SOCKS5 proxy, a recording proxy in front of nginx, a TLS relay,
an HLS origin made by ffmpeg.  Each listens on loopback and is stopped by the test."""
