/*
 * hello-tls: a TLS server that answers every connection with the address of the client,
 *
 *     hello from hello-tls; you are <address> port <port>
 *
 * and closes.  It accepts plain TLS and, on the same port, a PROXY protocol v2 header
 * followed by TLS (what Ember's edge sends on routes created with --proxy-protocol v2,
 * HAProxy's send-proxy-v2; spec: haproxy.org/download/2.9/doc/proxy-protocol.txt):
 *
 *  1. Peek at the first bytes (MSG_PEEK, nothing consumed): a TLS record starts with 0x16
 *     (handshake), a PROXY v2 header with its 12-byte signature.  Anything else is closed
 *     at once.
 *  2. PROXY v2: read the whole header and check it like ember.core.proxyv2 does (version
 *     2, command LOCAL or PROXY, one of the seven family/transport bytes, a length that
 *     covers the addresses, TLVs inside the block, the CRC32C TLV when there is one).  A
 *     bad or truncated header closes the connection without a byte sent.  PROXY over
 *     TCP/IPv4 or TCP/IPv6 names the client; LOCAL (the edge's health checks) and the
 *     valid families that carry no TCP client (UNSPEC, UDP, UNIX) mean the socket's peer,
 *     as the spec asks of a receiver.
 *  3. The TLS handshake with /etc/hello-tls/{cert,key}.pem, the line, close_notify.
 *
 * Addresses: IPv6 as inet_ntop writes it (RFC 5952), IPv4 and IPv4-mapped IPv6 addresses
 * as a dotted quad.  PORT (default 8443) is listened on with one dual-stack socket (IPv4
 * only on a kernel without IPv6).  One forked child per connection (auto-reaped: SIGCHLD
 * is ignored); a client that stalls for IO_TIMEOUT_S is dropped.  One log line per
 * connection on stderr, except for health checks (a connection closed before it sends
 * anything, or right after its PROXY v2 header): the edge makes one every 2 s.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#define CERT_FILE "/etc/hello-tls/cert.pem"
#define KEY_FILE "/etc/hello-tls/key.pem"
#define DEFAULT_PORT "8443"
#define IO_TIMEOUT_S 10
/* After our close_notify, how long to read what the client still sends: closing with
 * unread bytes would answer them with a RST, which can destroy the reply in flight. */
#define DRAIN_TIMEOUT_S 2

#define TLS_HANDSHAKE 0x16
#define PP2_HEADER_LEN 16
#define PP2_TYPE_CRC32C 0x03

static const unsigned char PP2_SIGNATURE[12] = {
	0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
};

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
	char buf[512];
	int n = snprintf(buf, sizeof buf, "hello-tls: ");
	va_list ap;
	va_start(ap, fmt);
	int m = vsnprintf(buf + n, sizeof buf - (size_t)n - 1, fmt, ap);
	va_end(ap);
	if (m < 0)
		m = 0;
	size_t len = (size_t)n + (size_t)m;
	if (len > sizeof buf - 2)
		len = sizeof buf - 2;
	buf[len++] = '\n';
	/* One write per line: the children's lines never interleave. */
	ssize_t w = write(STDERR_FILENO, buf, len);
	(void)w;
}

static void die_tls(const char *what)
{
	say("%s", what);
	ERR_print_errors_fp(stderr);
	exit(1);
}

/* -- addresses ---------------------------------------------------------------------------- */

struct endpoint {
	char addr[INET6_ADDRSTRLEN];
	unsigned port;
};

static void describe(const struct sockaddr_storage *ss, struct endpoint *out)
{
	if (ss->ss_family == AF_INET6) {
		const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)ss;
		out->port = ntohs(s6->sin6_port);
		/* An IPv4 client of the dual-stack socket is ::ffff:a.b.c.d: print a.b.c.d. */
		if (IN6_IS_ADDR_V4MAPPED(&s6->sin6_addr))
			inet_ntop(AF_INET, &s6->sin6_addr.s6_addr[12], out->addr, sizeof out->addr);
		else
			inet_ntop(AF_INET6, &s6->sin6_addr, out->addr, sizeof out->addr);
	} else {
		const struct sockaddr_in *s4 = (const struct sockaddr_in *)ss;
		out->port = ntohs(s4->sin_port);
		inet_ntop(AF_INET, &s4->sin_addr, out->addr, sizeof out->addr);
	}
}

/* -- PROXY protocol v2 -------------------------------------------------------------------- */

/* Read exactly n bytes; -1 on EOF, error or timeout (the spec: a receiver must reject
 * partial headers). */
static int read_full(int fd, unsigned char *buf, size_t n)
{
	size_t got = 0;
	while (got < n) {
		ssize_t r = recv(fd, buf + got, n - got, 0);
		if (r > 0)
			got += (size_t)r;
		else if (r < 0 && errno == EINTR)
			continue;
		else
			return -1;
	}
	return 0;
}

enum start { START_TLS, START_PROXY_V2, START_OTHER, START_EOF };

/* Wait for the next byte without consuming it: 1, 0 at EOF, -1 on error or timeout. */
static int peek_byte(int fd, unsigned char *byte)
{
	ssize_t r;
	do
		r = recv(fd, byte, 1, MSG_PEEK);
	while (r < 0 && errno == EINTR);
	return (int)r;
}

/* What the connection starts with, without consuming any of it. */
static enum start peek_start(int fd)
{
	unsigned char buf[sizeof PP2_SIGNATURE];
	ssize_t r = peek_byte(fd, buf);
	if (r == 0)
		return START_EOF;
	if (r != 1)
		return START_OTHER;
	if (buf[0] == TLS_HANDSHAKE)
		return START_TLS;
	if (buf[0] != PP2_SIGNATURE[0])
		return START_OTHER;
	/* MSG_WAITALL: wait for the whole signature (or EOF, or the receive timeout) instead
	 * of spinning on a header that arrives in pieces. */
	do
		r = recv(fd, buf, sizeof buf, MSG_PEEK | MSG_WAITALL);
	while (r < 0 && errno == EINTR);
	if (r != (ssize_t)sizeof buf || memcmp(buf, PP2_SIGNATURE, sizeof buf) != 0)
		return START_OTHER;
	return START_PROXY_V2;
}

/* CRC32C (Castagnoli, reflected polynomial 0x82F63B78), as RFC 4960 appendix B. */
static uint32_t crc32c(const unsigned char *p, size_t n)
{
	uint32_t crc = 0xFFFFFFFFu;
	while (n--) {
		crc ^= *p++;
		for (int k = 0; k < 8; k++)
			crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1u)));
	}
	return ~crc;
}

/* The TLVs between pos and end must tile the block exactly; the first CRC32C TLV must
 * match the whole header computed with its own value zeroed. */
static const char *check_tlvs(unsigned char *hdr, size_t pos, size_t end)
{
	int crc_seen = 0;
	while (pos < end) {
		if (end - pos < 3)
			return "stray bytes after the last TLV";
		unsigned type = hdr[pos];
		size_t len = (size_t)hdr[pos + 1] << 8 | hdr[pos + 2];
		if (len > end - pos - 3)
			return "a TLV runs past the header";
		if (type == PP2_TYPE_CRC32C && !crc_seen) {
			crc_seen = 1;
			if (len != 4)
				return "a CRC32C TLV that is not 4 bytes";
			unsigned char *v = hdr + pos + 3;
			uint32_t want = (uint32_t)v[0] << 24 | (uint32_t)v[1] << 16 |
					(uint32_t)v[2] << 8 | v[3];
			memset(v, 0, 4);
			if (crc32c(hdr, end) != want)
				return "its CRC32C does not match";
		}
		pos += 3 + len;
	}
	return NULL;
}

/* Consume the PROXY v2 header (peek_start saw its signature).  NULL when it is valid,
 * with *client replaced by its source for PROXY over TCP; otherwise what is wrong. */
static const char *read_proxy_v2(int fd, struct sockaddr_storage *client)
{
	static unsigned char hdr[PP2_HEADER_LEN + 0xFFFF];
	if (read_full(fd, hdr, PP2_HEADER_LEN) < 0)
		return "truncated";
	unsigned version = hdr[12] >> 4, command = hdr[12] & 0x0F, fam = hdr[13];
	size_t len = (size_t)hdr[14] << 8 | hdr[15];
	if (version != 2)
		return "version is not 2";
	if (command > 1) /* 0 LOCAL, 1 PROXY; receivers must drop anything else */
		return "unknown command";
	size_t addr_len;
	switch (fam) {
	case 0x00: /* UNSPEC */
		addr_len = 0;
		break;
	case 0x11: /* TCP over IPv4 */
	case 0x12: /* UDP over IPv4 */
		addr_len = 2 * 4 + 2 * 2;
		break;
	case 0x21: /* TCP over IPv6 */
	case 0x22: /* UDP over IPv6 */
		addr_len = 2 * 16 + 2 * 2;
		break;
	case 0x31: /* UNIX stream */
	case 0x32: /* UNIX datagram */
		addr_len = 2 * 108;
		break;
	default:
		return "invalid family/transport byte";
	}
	if (len < addr_len)
		return "address block shorter than its family needs";
	if (read_full(fd, hdr + PP2_HEADER_LEN, len) < 0)
		return "truncated";
	const char *bad = check_tlvs(hdr, PP2_HEADER_LEN + addr_len, PP2_HEADER_LEN + len);
	if (bad)
		return bad;
	const unsigned char *a = hdr + PP2_HEADER_LEN;
	if (command == 1 && fam == 0x11) {
		struct sockaddr_in *s4 = (struct sockaddr_in *)client;
		memset(client, 0, sizeof *client);
		s4->sin_family = AF_INET;
		memcpy(&s4->sin_addr, a, 4);      /* source address */
		memcpy(&s4->sin_port, a + 8, 2);  /* source port */
	} else if (command == 1 && fam == 0x21) {
		struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)client;
		memset(client, 0, sizeof *client);
		s6->sin6_family = AF_INET6;
		memcpy(&s6->sin6_addr, a, 16);
		memcpy(&s6->sin6_port, a + 32, 2);
	}
	return NULL;
}

/* -- one connection ----------------------------------------------------------------------- */

static void set_timeout(int fd, int option, int seconds)
{
	struct timeval tv = {.tv_sec = seconds};
	setsockopt(fd, SOL_SOCKET, option, &tv, sizeof tv);
}

static void serve(SSL_CTX *ctx, int fd, const struct sockaddr_storage *peer)
{
	struct endpoint from, client;
	describe(peer, &from);
	set_timeout(fd, SO_RCVTIMEO, IO_TIMEOUT_S);
	set_timeout(fd, SO_SNDTIMEO, IO_TIMEOUT_S);

	struct sockaddr_storage reported = *peer;
	enum start start = peek_start(fd);
	if (start == START_EOF)
		return; /* a TCP health check: connect, close */
	if (start == START_OTHER) {
		say("closed %s port %u: neither TLS nor a PROXY v2 header", from.addr, from.port);
		return;
	}
	if (start == START_PROXY_V2) {
		const char *bad = read_proxy_v2(fd, &reported);
		if (bad) {
			say("closed %s port %u: bad PROXY v2 header: %s", from.addr, from.port, bad);
			return;
		}
		unsigned char next;
		if (peek_byte(fd, &next) == 0)
			return; /* the edge's health check: a (LOCAL) header, then close */
	}
	describe(&reported, &client);

	SSL *ssl = SSL_new(ctx);
	if (!ssl || SSL_set_fd(ssl, fd) != 1 || SSL_accept(ssl) != 1) {
		const char *why = ERR_reason_error_string(ERR_get_error());
		say("closed %s port %u: TLS handshake failed: %s", from.addr, from.port,
		    why ? why : "connection closed");
		SSL_free(ssl);
		return;
	}
	char line[128];
	int n = snprintf(line, sizeof line, "hello from hello-tls; you are %s port %u\n",
			 client.addr, client.port);
	if (SSL_write(ssl, line, n) == n) {
		if (start == START_PROXY_V2)
			say("answered %s port %u (PROXY v2 from %s port %u)", client.addr,
			    client.port, from.addr, from.port);
		else
			say("answered %s port %u", client.addr, client.port);
		SSL_shutdown(ssl);
	}
	SSL_free(ssl);
	shutdown(fd, SHUT_WR);
	set_timeout(fd, SO_RCVTIMEO, DRAIN_TIMEOUT_S);
	char sink[4096];
	for (int i = 0; i < 16 && recv(fd, sink, sizeof sink, 0) > 0; i++)
		; /* bounded: a client that keeps sending is not worth a process */
}

/* -- main --------------------------------------------------------------------------------- */

static int listen_on(const char *port_text)
{
	char *end;
	errno = 0;
	long port = strtol(port_text, &end, 10);
	if (errno || end == port_text || *end || port < 1 || port > 65535) {
		say("PORT must be a port number (1-65535), not '%s'", port_text);
		exit(2);
	}
	int one = 1, zero = 0;
	int fd = socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd >= 0) {
		struct sockaddr_in6 s6 = {.sin6_family = AF_INET6, .sin6_addr = in6addr_any};
		s6.sin6_port = htons((uint16_t)port);
		setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
		setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
		if (bind(fd, (struct sockaddr *)&s6, sizeof s6) < 0)
			goto fail;
	} else if (errno == EAFNOSUPPORT) {
		fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (fd < 0)
			goto fail;
		struct sockaddr_in s4 = {.sin_family = AF_INET, .sin_addr.s_addr = INADDR_ANY};
		s4.sin_port = htons((uint16_t)port);
		setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
		if (bind(fd, (struct sockaddr *)&s4, sizeof s4) < 0)
			goto fail;
	} else {
		goto fail;
	}
	if (listen(fd, 128) < 0)
		goto fail;
	say("listening on port %ld (TLS, optionally after a PROXY v2 header)", port);
	return fd;
fail:
	say("cannot listen on port %ld: %s", port, strerror(errno));
	exit(1);
}

int main(void)
{
	const char *port = getenv("PORT");
	/* Children are reaped by the kernel; a client gone mid-write is an error, not a kill. */
	signal(SIGCHLD, SIG_IGN);
	signal(SIGPIPE, SIG_IGN);

	SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
	if (!ctx)
		die_tls("cannot create the TLS context");
	SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
	if (SSL_CTX_use_certificate_chain_file(ctx, CERT_FILE) != 1)
		die_tls("cannot load " CERT_FILE);
	if (SSL_CTX_use_PrivateKey_file(ctx, KEY_FILE, SSL_FILETYPE_PEM) != 1)
		die_tls("cannot load " KEY_FILE);
	if (SSL_CTX_check_private_key(ctx) != 1)
		die_tls(KEY_FILE " does not match " CERT_FILE);

	int lfd = listen_on(port && *port ? port : DEFAULT_PORT);
	for (;;) {
		struct sockaddr_storage peer;
		socklen_t peer_len = sizeof peer;
		int fd = accept4(lfd, (struct sockaddr *)&peer, &peer_len, SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno != EINTR && errno != ECONNABORTED) {
				say("accept: %s", strerror(errno));
				sleep(1); /* out of descriptors or memory: do not spin */
			}
			continue;
		}
		pid_t pid = fork();
		if (pid == 0) {
			close(lfd);
			serve(ctx, fd, &peer);
			_exit(0);
		}
		if (pid < 0)
			say("fork: %s", strerror(errno));
		close(fd);
	}
}
