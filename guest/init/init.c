/*
 * ember-init: the platform init of every Ember microVM (PID 1 in the initramfs).
 *
 * Boot: mount /proc /sys /dev, load the kernel modules listed in
 * /lib/modules/load.order (finit_module), find the config drive (the virtio
 * block device that starts with "ember-guest-config 1"; format in
 * docs/specs/guest-config.md), mount the root filesystem and volumes, configure
 * eth0 (ioctl + rtnetlink), set the hostname, switch into the root filesystem,
 * place the secrets file on a tmpfs (mode 0400, owned by the workload user), and
 * start the command with its env, user and working directory.
 *
 * Run: forward SIGTERM/SIGINT/SIGPWR and the ACPI power button as the configured
 * kill signal (other catchable signals as themselves), SIGKILL after the kill
 * timeout, reap every zombie.  Run the exec health checks on their schedule (as the
 * command's user, env and workdir; SIGKILL at their timeout) and print each result
 *     ember-init: check TOKEN I ok | fail DETAIL
 * where TOKEN is the config drive's per-boot secret (whose device node is removed
 * before the command starts), so the workload cannot forge a result.  When the
 * command exits, print
 *     ember-init: exit status N
 * on the console (N = exit code, or 128 + signal number), then power off.
 * A platform failure prints "ember-init: boot failed: REASON" and powers off
 * without an exit status line.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <linux/if_addr.h>
#include <linux/input.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <net/if.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define NEWROOT "/newroot"
#define MAGIC "ember-guest-config 1\n"
#define CONFIG_MAX (16u << 20)
#define MAX_EVDEV 8
#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#define CHECK_STARTUP_MS 1000 /* a check that never passed yet runs at least this often */

extern char **environ;

/* -- console ------------------------------------------------------------------ */

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
	char buf[1024];
	int n = snprintf(buf, sizeof buf, "ember-init: ");
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
	/* One write per line so that it never interleaves with the workload's output. */
	ssize_t w = write(STDERR_FILENO, buf, len);
	(void)w;
}

static _Noreturn void power_off(void)
{
	sync();
	/* ACPI (QEMU microvm,acpi=on) can power off. Without it (Firecracker) a power-off
	 * would only halt the CPU; a reboot ends the VMM there, and under QEMU's -no-reboot. */
	if (access("/sys/firmware/acpi", F_OK) == 0)
		reboot(RB_POWER_OFF);
	reboot(RB_AUTOBOOT);
	for (;;)
		pause();
}

static _Noreturn void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static _Noreturn void fail(const char *fmt, ...)
{
	char buf[900];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	say("boot failed: %s", buf);
	power_off();
}

static void *xrealloc(void *p, size_t n)
{
	void *q = realloc(p, n ? n : 1);
	if (!q)
		fail("out of memory");
	return q;
}

/* -- the config drive ------------------------------------------------------------ */

struct mnt {
	char *source, *target, *fstype, *options;
};

/* An exec health check: its config, then its run state (times: now_ms()). */
struct check {
	char **argv; /* NULL-terminated */
	long interval_ms, timeout_ms;
	long long next_ms; /* not running: when it starts next */
	long long kill_ms; /* running: when it times out */
	pid_t pid;         /* running: its process (and process group); else 0 */
	int passed;        /* it passed at least once */
	int timed_out;     /* running: SIGKILL sent at the timeout */
};

struct config {
	char *hostname;
	struct mnt root;
	struct mnt *mounts;
	size_t nmounts;
	long mtu;
	char *ipv6, *ipv6_gw, *ipv4, *ipv4_gw;
	char **nameservers;
	size_t nnameservers;
	char **argv; /* NULL-terminated */
	size_t argc;
	char **env; /* NULL-terminated */
	size_t envc;
	char *user;
	char *workdir;
	int kill_signal;
	long kill_timeout_ms;
	char *secrets_path;
	char *secrets_data;
	size_t secrets_len;
	struct check *checks;
	size_t nchecks;
	char *check_token;
};

static int hexval(int c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	c = tolower(c);
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	return -1;
}

/* Decode %HH escapes in place; returns the decoded length or -1 if malformed. */
static long pct_decode(char *s)
{
	char *out = s;
	for (char *in = s; *in; in++) {
		if (*in != '%') {
			*out++ = *in;
			continue;
		}
		int hi = hexval((unsigned char)in[1]);
		int lo = hi < 0 ? -1 : hexval((unsigned char)in[2]);
		if (lo < 0)
			return -1;
		*out++ = (char)(hi * 16 + lo);
		in += 2;
	}
	*out = '\0';
	return out - s;
}

static void push(char ***arr, size_t *n, char *s)
{
	*arr = xrealloc(*arr, (*n + 2) * sizeof **arr);
	(*arr)[(*n)++] = s;
	(*arr)[*n] = NULL;
}

static long parse_long(const char *s, long lo, long hi, const char *what)
{
	char *end;
	errno = 0;
	long v = strtol(s, &end, 10);
	if (errno || end == s || *end || v < lo || v > hi)
		fail("config: bad %s '%s'", what, s);
	return v;
}

/* A string field: decoded, and it must not contain NUL. */
static char *field_str(char *f, const char *key)
{
	long n = pct_decode(f);
	if (n < 0 || (size_t)n != strlen(f))
		fail("config: bad encoding in '%s'", key);
	return f;
}

/* The per-boot secret of the check lines: 16-128 of [A-Za-z0-9_-]. */
static int valid_token(const char *s)
{
	size_t n = strspn(s, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-");
	return n == strlen(s) && n >= 16 && n <= 128;
}

/* "check INTERVAL-MS TIMEOUT-MS ARGV": ARGV decodes to words each ended by a NUL. */
static void parse_check(struct config *c, char **a, unsigned lineno)
{
	struct check k = {0};
	k.interval_ms = parse_long(field_str(a[0], "check"), 100, 86400000L, "check interval");
	k.timeout_ms = parse_long(field_str(a[1], "check"), 100, k.interval_ms, "check timeout");
	long n = pct_decode(a[2]);
	if (n <= 0 || a[2][n - 1] != '\0')
		fail("config line %u: a check's command is words each ended by %%00", lineno);
	size_t argc = 0;
	for (char *w = a[2]; w < a[2] + n; w += strlen(w) + 1)
		push(&k.argv, &argc, w);
	if (!k.argv[0][0])
		fail("config line %u: a check's program is empty", lineno);
	c->checks = xrealloc(c->checks, (c->nchecks + 1) * sizeof *c->checks);
	c->checks[c->nchecks++] = k;
}

static void parse_line(struct config *c, char *line, unsigned lineno)
{
	char *fields[6];
	size_t nf = 0;
	char *p = line;
	for (;;) {
		char *sp = strchr(p, ' ');
		if (nf == sizeof fields / sizeof *fields)
			fail("config line %u: too many fields", lineno);
		fields[nf++] = p;
		if (!sp)
			break;
		*sp = '\0';
		p = sp + 1;
	}
	const char *key = fields[0];
	size_t nargs = nf - 1;
	char **a = fields + 1;
#define WANT(n)                                                                        \
	do {                                                                           \
		if (nargs != (n))                                                      \
			fail("config line %u: '%s' takes %d field(s)", lineno, key, (n)); \
		for (size_t i_ = 0; i_ < nargs; i_++)                                  \
			a[i_] = field_str(a[i_], key);                                 \
	} while (0)

	if (!strcmp(key, "hostname")) {
		WANT(1);
		c->hostname = a[0];
	} else if (!strcmp(key, "root")) {
		WANT(3);
		c->root = (struct mnt){a[0], "/", a[1], a[2]};
	} else if (!strcmp(key, "mount")) {
		WANT(4);
		c->mounts = xrealloc(c->mounts, (c->nmounts + 1) * sizeof *c->mounts);
		c->mounts[c->nmounts++] = (struct mnt){a[0], a[1], a[2], a[3]};
	} else if (!strcmp(key, "mtu")) {
		WANT(1);
		c->mtu = parse_long(a[0], 68, 65535, "mtu");
	} else if (!strcmp(key, "ipv6")) {
		WANT(1);
		c->ipv6 = a[0];
	} else if (!strcmp(key, "ipv6-gateway")) {
		WANT(1);
		c->ipv6_gw = a[0];
	} else if (!strcmp(key, "ipv4")) {
		WANT(1);
		c->ipv4 = a[0];
	} else if (!strcmp(key, "ipv4-gateway")) {
		WANT(1);
		c->ipv4_gw = a[0];
	} else if (!strcmp(key, "nameserver")) {
		WANT(1);
		push(&c->nameservers, &c->nnameservers, a[0]);
	} else if (!strcmp(key, "arg")) {
		WANT(1);
		push(&c->argv, &c->argc, a[0]);
	} else if (!strcmp(key, "env")) {
		WANT(1);
		if (!strchr(a[0], '=') || a[0][0] == '=')
			fail("config line %u: env needs KEY=VALUE", lineno);
		push(&c->env, &c->envc, a[0]);
	} else if (!strcmp(key, "user")) {
		WANT(1);
		c->user = a[0];
	} else if (!strcmp(key, "workdir")) {
		WANT(1);
		c->workdir = a[0];
	} else if (!strcmp(key, "kill-signal")) {
		WANT(1);
		c->kill_signal = (int)parse_long(a[0], 1, 64, "kill-signal");
	} else if (!strcmp(key, "kill-timeout-ms")) {
		WANT(1);
		c->kill_timeout_ms = parse_long(a[0], 0, 86400000L, "kill-timeout-ms");
	} else if (!strcmp(key, "secrets")) {
		if (nargs != 2)
			fail("config line %u: 'secrets' takes 2 fields", lineno);
		c->secrets_path = field_str(a[0], key);
		long n = pct_decode(a[1]); /* binary: may contain anything */
		if (n < 0)
			fail("config line %u: bad encoding in 'secrets'", lineno);
		c->secrets_data = a[1];
		c->secrets_len = (size_t)n;
	} else if (!strcmp(key, "check-token")) {
		WANT(1);
		if (!valid_token(a[0]))
			fail("config line %u: bad check-token", lineno);
		c->check_token = a[0];
	} else if (!strcmp(key, "check")) {
		if (nargs != 3)
			fail("config line %u: 'check' takes 3 fields", lineno);
		parse_check(c, a, lineno);
	} else {
		/* Forward compatibility: a newer agent may add keys an older init ignores. */
		say("config line %u: ignoring unknown key '%s'", lineno, key);
	}
#undef WANT
}

static void parse_config(struct config *c, char *text)
{
	*c = (struct config){
	    .root = {"/dev/vda", "/", "ext4", "rw"},
	    .workdir = "/",
	    .user = "",
	    .kill_signal = SIGTERM,
	    .kill_timeout_ms = 10000,
	};
	char *p = text + strlen(MAGIC);
	unsigned lineno = 1;
	int ended = 0;
	while (*p) {
		char *nl = strchr(p, '\n');
		if (!nl)
			fail("config: line %u is not terminated", lineno + 1);
		*nl = '\0';
		lineno++;
		if (!strcmp(p, "end")) {
			ended = 1;
			break;
		}
		if (*p)
			parse_line(c, p, lineno);
		p = nl + 1;
	}
	if (!ended)
		fail("config: no 'end' line (truncated config drive?)");
	if (!c->argc)
		fail("config: no command ('arg' lines)");
	if (c->nchecks && !c->check_token)
		fail("config: 'check' lines need a 'check-token'");
}

/* Read a whole block device holding a config; NULL if it is not a config drive. */
static char *read_config_drive(const char *dev)
{
	int fd = open(dev, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return NULL;
	char *buf = xrealloc(NULL, 65536 + 1);
	size_t cap = 65536, len = 0;
	for (;;) {
		if (len == cap) {
			if (cap >= CONFIG_MAX)
				fail("config drive %s: larger than %u bytes", dev, CONFIG_MAX);
			cap *= 2;
			buf = xrealloc(buf, cap + 1);
		}
		ssize_t n = read(fd, buf + len, cap - len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		len += (size_t)n;
		if (len >= strlen(MAGIC) && memcmp(buf, MAGIC, strlen(MAGIC))) {
			len = 0; /* not ours */
			break;
		}
		if (memchr(buf, '\0', len))
			break; /* the zero padding after the config */
	}
	close(fd);
	buf[len] = '\0';
	if (len < strlen(MAGIC) || memcmp(buf, MAGIC, strlen(MAGIC))) {
		free(buf);
		return NULL;
	}
	return buf;
}

static int by_name(const struct dirent **a, const struct dirent **b)
{
	return strcmp((*a)->d_name, (*b)->d_name);
}

/* The config drive: the first virtio disk (by name) that starts with MAGIC; its
 * device path goes to dev. */
static char *find_config(char *dev, size_t cap)
{
	for (int attempt = 0; attempt < 500; attempt++) {
		struct dirent **names;
		int n = scandir("/sys/block", &names, NULL, by_name);
		char *found = NULL;
		for (int i = 0; i < n; i++) {
			if (!found && !strncmp(names[i]->d_name, "vd", 2)) {
				snprintf(dev, cap, "/dev/%s", names[i]->d_name);
				found = read_config_drive(dev);
			}
			free(names[i]);
		}
		if (n >= 0)
			free(names);
		if (found)
			return found;
		usleep(10000);
	}
	fail("no config drive (a virtio disk starting with 'ember-guest-config 1')");
}

/* -- filesystems ----------------------------------------------------------------- */

static void mkdir_p(const char *path, mode_t mode)
{
	char tmp[PATH_MAX];
	if (snprintf(tmp, sizeof tmp, "%s", path) >= (int)sizeof tmp)
		return;
	for (char *p = tmp + 1; *p; p++) {
		if (*p == '/') {
			*p = '\0';
			mkdir(tmp, 0755);
			*p = '/';
		}
	}
	mkdir(tmp, mode);
}

static const struct {
	const char *name;
	unsigned long set, clear;
} mount_flags[] = {
    {"ro", MS_RDONLY, 0},         {"rw", 0, MS_RDONLY},         {"nosuid", MS_NOSUID, 0},
    {"suid", 0, MS_NOSUID},       {"nodev", MS_NODEV, 0},       {"dev", 0, MS_NODEV},
    {"noexec", MS_NOEXEC, 0},     {"exec", 0, MS_NOEXEC},       {"sync", MS_SYNCHRONOUS, 0},
    {"noatime", MS_NOATIME, 0},   {"relatime", MS_RELATIME, 0}, {"nodiratime", MS_NODIRATIME, 0},
    {"strictatime", MS_STRICTATIME, 0},
};

/* Split "ro,noatime,data=ordered" into mount flags and the filesystem's own data. */
static unsigned long mount_options(const char *opts, char *data, size_t cap)
{
	unsigned long flags = 0;
	char buf[1024];
	snprintf(buf, sizeof buf, "%s", opts);
	data[0] = '\0';
	char *save = NULL;
	for (char *o = strtok_r(buf, ",", &save); o; o = strtok_r(NULL, ",", &save)) {
		int known = 0;
		for (size_t i = 0; i < sizeof mount_flags / sizeof *mount_flags; i++) {
			if (!strcmp(o, mount_flags[i].name)) {
				flags = (flags | mount_flags[i].set) & ~mount_flags[i].clear;
				known = 1;
			}
		}
		if (!known && o[0] && o[0] != '-') {
			size_t len = strlen(data);
			snprintf(data + len, cap - len, "%s%s", len ? "," : "", o);
		}
	}
	return flags;
}

static void do_mount(const struct mnt *m, const char *prefix)
{
	char target[PATH_MAX], data[1024];
	snprintf(target, sizeof target, "%s%s", prefix, m->target);
	mkdir_p(target, 0755);
	unsigned long flags = mount_options(m->options, data, sizeof data);
	if (mount(m->source, target, m->fstype, flags, data[0] ? data : NULL))
		fail("mount %s on %s (%s, %s): %s", m->source, m->target[0] ? m->target : "/",
		     m->fstype, m->options, strerror(errno));
}

/* Delete the initramfs's files (they would pin memory forever); stays on one device. */
static void remove_tree(int dirfd, dev_t dev)
{
	DIR *d = fdopendir(dirfd);
	if (!d) {
		close(dirfd);
		return;
	}
	struct dirent *e;
	while ((e = readdir(d))) {
		if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
			continue;
		struct stat st;
		if (fstatat(dirfd, e->d_name, &st, AT_SYMLINK_NOFOLLOW) || st.st_dev != dev)
			continue;
		if (S_ISDIR(st.st_mode)) {
			int sub = openat(dirfd, e->d_name, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
			if (sub >= 0)
				remove_tree(sub, dev);
			unlinkat(dirfd, e->d_name, AT_REMOVEDIR);
		} else {
			unlinkat(dirfd, e->d_name, 0);
		}
	}
	closedir(d);
}

static void switch_root(void)
{
	static const char *const moved[] = {"/dev", "/proc", "/sys"};
	for (size_t i = 0; i < sizeof moved / sizeof *moved; i++) {
		char target[64];
		snprintf(target, sizeof target, NEWROOT "%s", moved[i]);
		mkdir(target, 0755);
		if (mount(moved[i], target, NULL, MS_MOVE, NULL))
			fail("move %s into the root filesystem: %s", moved[i], strerror(errno));
	}
	if (chdir(NEWROOT))
		fail("chdir " NEWROOT ": %s", strerror(errno));
	struct stat st;
	int fd = open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd >= 0 && !fstat(fd, &st))
		remove_tree(fd, st.st_dev);
	if (mount(".", "/", NULL, MS_MOVE, NULL))
		fail("move the root filesystem to /: %s", strerror(errno));
	if (chroot(".") || chdir("/"))
		fail("chroot: %s", strerror(errno));
}

static void finish_dev(void)
{
	mkdir("/dev/pts", 0755);
	mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620");
	mkdir("/dev/shm", 01777);
	mount("shm", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
	static const char *const links[][2] = {
	    {"/proc/self/fd", "/dev/fd"},     {"/proc/self/fd/0", "/dev/stdin"},
	    {"/proc/self/fd/1", "/dev/stdout"}, {"/proc/self/fd/2", "/dev/stderr"},
	    {"pts/ptmx", "/dev/ptmx"},
	};
	for (size_t i = 0; i < sizeof links / sizeof *links; i++)
		if (symlink(links[i][0], links[i][1]) && errno == EEXIST && i == 4) {
			unlink(links[i][1]);
			if (symlink(links[i][0], links[i][1]))
				say("warning: /dev/ptmx: %s", strerror(errno));
		}
}

/* -- modules ------------------------------------------------------------------------ */

static void load_modules(void)
{
	FILE *f = fopen("/lib/modules/load.order", "re");
	if (!f)
		return;
	char name[128];
	while (fgets(name, sizeof name, f)) {
		name[strcspn(name, "\r\n")] = '\0';
		if (!name[0] || name[0] == '#')
			continue;
		char path[200];
		snprintf(path, sizeof path, "/lib/modules/%s.ko", name);
		int fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			fail("module %s: %s", path, strerror(errno));
		if (syscall(SYS_finit_module, fd, "", 0) && errno != EEXIST)
			fail("load module %s: %s", name, strerror(errno));
		close(fd);
	}
	fclose(f);
}

/* -- network -------------------------------------------------------------------------- */

static void if_up(int sock, const char *ifname, long mtu)
{
	struct ifreq ifr = {0};
	snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", ifname);
	if (mtu > 0) {
		ifr.ifr_mtu = (int)mtu;
		if (ioctl(sock, SIOCSIFMTU, &ifr))
			fail("%s: set mtu %ld: %s", ifname, mtu, strerror(errno));
	}
	if (ioctl(sock, SIOCGIFFLAGS, &ifr))
		fail("%s: %s", ifname, strerror(errno));
	ifr.ifr_flags |= IFF_UP;
	if (ioctl(sock, SIOCSIFFLAGS, &ifr))
		fail("%s: up: %s", ifname, strerror(errno));
}

struct nlreq {
	struct nlmsghdr nh;
	union {
		struct ifaddrmsg ifa;
		struct rtmsg rt;
	} u;
	char attrs[256];
};

static void nl_attr(struct nlreq *r, unsigned short type, const void *data, size_t len)
{
	struct rtattr *rta = (struct rtattr *)((char *)r + NLMSG_ALIGN(r->nh.nlmsg_len));
	rta->rta_type = type;
	rta->rta_len = (unsigned short)RTA_LENGTH(len);
	memcpy(RTA_DATA(rta), data, len);
	r->nh.nlmsg_len = NLMSG_ALIGN(r->nh.nlmsg_len) + (unsigned)RTA_ALIGN(rta->rta_len);
}

static void nl_talk(int nl, struct nlreq *r, const char *what)
{
	static unsigned seq;
	r->nh.nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
	r->nh.nlmsg_seq = ++seq;
	struct sockaddr_nl kernel = {.nl_family = AF_NETLINK};
	if (sendto(nl, r, r->nh.nlmsg_len, 0, (struct sockaddr *)&kernel, sizeof kernel) < 0)
		fail("%s: netlink send: %s", what, strerror(errno));
	char buf[4096];
	ssize_t n = recv(nl, buf, sizeof buf, 0);
	if (n < 0)
		fail("%s: netlink recv: %s", what, strerror(errno));
	struct nlmsghdr *h = (struct nlmsghdr *)buf;
	if (!NLMSG_OK(h, (unsigned)n) || h->nlmsg_type != NLMSG_ERROR)
		fail("%s: unexpected netlink answer", what);
	int err = ((struct nlmsgerr *)NLMSG_DATA(h))->error;
	if (err && err != -EEXIST)
		fail("%s: %s", what, strerror(-err));
}

/* "ADDR/PREFIX" -> family, address bytes, prefix length. */
static int parse_cidr(const char *s, int family, void *addr, int *prefix)
{
	char buf[INET6_ADDRSTRLEN + 8];
	snprintf(buf, sizeof buf, "%s", s);
	char *slash = strchr(buf, '/');
	int max = family == AF_INET6 ? 128 : 32;
	*prefix = max;
	if (slash) {
		*slash = '\0';
		char *end;
		long v = strtol(slash + 1, &end, 10);
		if (*end || end == slash + 1 || v < 0 || v > max)
			return -1;
		*prefix = (int)v;
	}
	return inet_pton(family, buf, addr) == 1 ? 0 : -1;
}

static void add_address(int nl, int ifindex, int family, const char *cidr)
{
	unsigned char addr[16];
	int prefix;
	if (parse_cidr(cidr, family, addr, &prefix))
		fail("config: bad address '%s'", cidr);
	size_t alen = family == AF_INET6 ? 16 : 4;
	struct nlreq r = {0};
	r.nh.nlmsg_len = NLMSG_LENGTH(sizeof r.u.ifa);
	r.nh.nlmsg_type = RTM_NEWADDR;
	r.u.ifa.ifa_family = (unsigned char)family;
	r.u.ifa.ifa_prefixlen = (unsigned char)prefix;
	/* No duplicate address detection: the host allocated the address, and DAD would
	 * keep it unusable for a second or more after boot. */
	r.u.ifa.ifa_flags = IFA_F_NODAD;
	r.u.ifa.ifa_index = (unsigned)ifindex;
	nl_attr(&r, IFA_LOCAL, addr, alen);
	nl_attr(&r, IFA_ADDRESS, addr, alen);
	nl_talk(nl, &r, cidr);
}

static void add_default_route(int nl, int ifindex, int family, const char *gw)
{
	unsigned char addr[16];
	if (inet_pton(family, gw, addr) != 1)
		fail("config: bad gateway '%s'", gw);
	struct nlreq r = {0};
	r.nh.nlmsg_len = NLMSG_LENGTH(sizeof r.u.rt);
	r.nh.nlmsg_type = RTM_NEWROUTE;
	r.u.rt.rtm_family = (unsigned char)family;
	r.u.rt.rtm_table = RT_TABLE_MAIN;
	r.u.rt.rtm_protocol = RTPROT_BOOT;
	r.u.rt.rtm_scope = RT_SCOPE_UNIVERSE;
	r.u.rt.rtm_type = RTN_UNICAST;
	/* The gateway is on the link even when it lies outside the address's prefix
	 * (a /128 or /32 per instance). */
	r.u.rt.rtm_flags = RTNH_F_ONLINK;
	nl_attr(&r, RTA_GATEWAY, addr, family == AF_INET6 ? 16 : 4);
	uint32_t oif = (uint32_t)ifindex;
	nl_attr(&r, RTA_OIF, &oif, sizeof oif);
	char what[80];
	snprintf(what, sizeof what, "default route via %s", gw);
	nl_talk(nl, &r, what);
}

static void write_file(const char *path, const char *text)
{
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		return;
	ssize_t w = write(fd, text, strlen(text));
	(void)w;
	close(fd);
}

static void setup_network(const struct config *c)
{
	int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (sock < 0)
		fail("socket: %s", strerror(errno));
	if_up(sock, "lo", 0);
	if (!c->ipv6 && !c->ipv4) {
		close(sock);
		return;
	}
	int ifindex = (int)if_nametoindex("eth0");
	if (!ifindex)
		fail("the config has a network but the VM has no eth0");
	/* Addresses come from the config only, never from router advertisements. */
	write_file("/proc/sys/net/ipv6/conf/eth0/accept_ra", "0");
	write_file("/proc/sys/net/ipv6/conf/eth0/autoconf", "0");
	if_up(sock, "eth0", c->mtu);
	close(sock);

	int nl = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
	if (nl < 0)
		fail("netlink socket: %s", strerror(errno));
	if (c->ipv6)
		add_address(nl, ifindex, AF_INET6, c->ipv6);
	if (c->ipv4)
		add_address(nl, ifindex, AF_INET, c->ipv4);
	if (c->ipv6_gw)
		add_default_route(nl, ifindex, AF_INET6, c->ipv6_gw);
	if (c->ipv4_gw)
		add_default_route(nl, ifindex, AF_INET, c->ipv4_gw);
	close(nl);
}

static void write_resolv_conf(const struct config *c)
{
	if (!c->nnameservers)
		return;
	/* The root filesystem is the instance's own copy: replace whatever is there
	 * (often a dangling symlink into /run). */
	unlink("/etc/resolv.conf");
	mkdir("/etc", 0755);
	FILE *f = fopen("/etc/resolv.conf", "we");
	if (!f) {
		say("warning: /etc/resolv.conf: %s", strerror(errno));
		return;
	}
	for (size_t i = 0; i < c->nnameservers; i++)
		fprintf(f, "nameserver %s\n", c->nameservers[i]);
	fclose(f);
}

/* -- the workload's user ----------------------------------------------------------- */

struct creds {
	uid_t uid;
	gid_t gid;
	gid_t groups[64];
	size_t ngroups;
	char home[PATH_MAX];
};

static int is_number(const char *s)
{
	if (!*s)
		return 0;
	for (; *s; s++)
		if (!isdigit((unsigned char)*s))
			return 0;
	return 1;
}

/* Field `idx` (0-based) of a colon-separated line, copied into out. */
static int colon_field(const char *line, int idx, char *out, size_t cap)
{
	const char *p = line;
	for (int i = 0; i < idx; i++) {
		p = strchr(p, ':');
		if (!p)
			return -1;
		p++;
	}
	size_t len = strcspn(p, ":\n");
	if (len >= cap)
		len = cap - 1;
	memcpy(out, p, len);
	out[len] = '\0';
	return 0;
}

/*
 * OCI "User": "", "user", "uid", "user:group", "uid:gid" (any mix). Names are looked
 * up in the root filesystem's /etc/passwd and /etc/group; a user there also gets its
 * supplementary groups and home directory.
 */
static void resolve_user(const char *spec, struct creds *cr)
{
	char user[256], group[256] = "";
	/* No user is root, looked up like any other (HOME=/root, root's groups). */
	snprintf(user, sizeof user, "%s", spec[0] ? spec : "0");
	char *colon = strchr(user, ':');
	if (colon) {
		*colon = '\0';
		snprintf(group, sizeof group, "%s", colon + 1);
	}
	*cr = (struct creds){0};
	snprintf(cr->home, sizeof cr->home, "/");
	char name[256] = "";
	int found = 0;
	if (user[0]) {
		FILE *f = fopen("/etc/passwd", "re");
		char line[1024], f0[256], f2[32], f3[32], f5[PATH_MAX];
		while (f && fgets(line, sizeof line, f)) {
			if (colon_field(line, 0, f0, sizeof f0) || colon_field(line, 2, f2, sizeof f2) ||
			    colon_field(line, 3, f3, sizeof f3) || colon_field(line, 5, f5, sizeof f5))
				continue;
			if (is_number(user) ? strcmp(f2, user) : strcmp(f0, user))
				continue;
			cr->uid = (uid_t)strtoul(f2, NULL, 10);
			cr->gid = (gid_t)strtoul(f3, NULL, 10);
			snprintf(name, sizeof name, "%s", f0);
			snprintf(cr->home, sizeof cr->home, "%s", f5[0] ? f5 : "/");
			found = 1;
			break;
		}
		if (f)
			fclose(f);
		if (!found) {
			if (!is_number(user))
				fail("user '%s' is not in the image's /etc/passwd", user);
			cr->uid = (uid_t)strtoul(user, NULL, 10);
		}
	}
	if (group[0] || name[0]) {
		FILE *f = fopen("/etc/group", "re");
		char line[4096], f0[256], f2[32], members[3800];
		int gfound = 0;
		while (f && fgets(line, sizeof line, f)) {
			if (colon_field(line, 0, f0, sizeof f0) || colon_field(line, 2, f2, sizeof f2))
				continue;
			if (group[0] && !gfound && !(is_number(group) ? strcmp(f2, group) : strcmp(f0, group))) {
				cr->gid = (gid_t)strtoul(f2, NULL, 10);
				gfound = 1;
			}
			if (name[0] && !colon_field(line, 3, members, sizeof members) &&
			    cr->ngroups < sizeof cr->groups / sizeof *cr->groups) {
				char *save = NULL;
				for (char *m = strtok_r(members, ",", &save); m; m = strtok_r(NULL, ",", &save))
					if (!strcmp(m, name)) {
						cr->groups[cr->ngroups++] = (gid_t)strtoul(f2, NULL, 10);
						break;
					}
			}
		}
		if (f)
			fclose(f);
		if (group[0] && !gfound) {
			if (!is_number(group))
				fail("group '%s' is not in the image's /etc/group", group);
			cr->gid = (gid_t)strtoul(group, NULL, 10);
		}
	}
}

/* -- secrets --------------------------------------------------------------------------- */

static void place_secrets(const struct config *c, const struct creds *cr)
{
	if (!c->secrets_path)
		return;
	char dir[PATH_MAX];
	snprintf(dir, sizeof dir, "%s", c->secrets_path);
	char *slash = strrchr(dir, '/');
	if (!slash || slash == dir)
		fail("secrets path '%s' needs a directory of its own", c->secrets_path);
	*slash = '\0';
	mkdir_p(dir, 0755);
	/* Its own small tmpfs: never on a disk, gone when the VM stops. */
	char opts[64];
	snprintf(opts, sizeof opts, "mode=0755,size=%zu", c->secrets_len + (1u << 20));
	if (mount("ember-secrets", dir, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, opts))
		fail("mount the secrets tmpfs on %s: %s", dir, strerror(errno));
	int fd = open(c->secrets_path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0400);
	if (fd < 0)
		fail("create %s: %s", c->secrets_path, strerror(errno));
	for (size_t off = 0; off < c->secrets_len;) {
		ssize_t n = write(fd, c->secrets_data + off, c->secrets_len - off);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			fail("write %s: %s", c->secrets_path, strerror(errno));
		off += (size_t)n;
	}
	if (fchown(fd, cr->uid, cr->gid) || fchmod(fd, 0400))
		fail("chown %s: %s", c->secrets_path, strerror(errno));
	close(fd);
	memset(c->secrets_data, 0, c->secrets_len);
}

/* -- running the command ---------------------------------------------------------------- */

static char **final_env(const struct config *c, const struct creds *cr)
{
	char **env = NULL;
	size_t n = 0;
	int has_path = 0, has_home = 0, has_hostname = 0;
	for (size_t i = 0; i < c->envc; i++) {
		has_path |= !strncmp(c->env[i], "PATH=", 5);
		has_home |= !strncmp(c->env[i], "HOME=", 5);
		has_hostname |= !strncmp(c->env[i], "HOSTNAME=", 9);
		push(&env, &n, c->env[i]);
	}
	char *s;
	if (!has_path)
		push(&env, &n, "PATH=" DEFAULT_PATH);
	if (!has_home && asprintf(&s, "HOME=%s", cr->home) > 0)
		push(&env, &n, s);
	if (!has_hostname && c->hostname && asprintf(&s, "HOSTNAME=%s", c->hostname) > 0)
		push(&env, &n, s);
	return env;
}

/* In a child of PID 1, before its exec: default signal dispositions, nothing blocked,
 * a session (and process group) of its own, the command's user and working directory
 * (exit 126 when that fails).  The check token stays with PID 1 alone. */
static void become_workload(const struct config *c, const struct creds *cr)
{
	if (c->check_token)
		explicit_bzero(c->check_token, strlen(c->check_token));
	sigset_t none;
	sigemptyset(&none);
	for (int s = 1; s < NSIG; s++)
		signal(s, SIG_DFL);
	sigprocmask(SIG_SETMASK, &none, NULL);
	setsid();
	if (setgroups(cr->ngroups, cr->groups) || setgid(cr->gid) || setuid(cr->uid)) {
		say("cannot become uid %u gid %u: %s", cr->uid, cr->gid, strerror(errno));
		_exit(126);
	}
	if (chdir(c->workdir)) {
		say("working directory %s: %s", c->workdir, strerror(errno));
		_exit(126);
	}
}

static _Noreturn void exec_child(const struct config *c, const struct creds *cr, char **env)
{
	become_workload(c, cr);
	environ = env;
	execvp(c->argv[0], c->argv);
	int err = errno;
	say("exec %s: %s", c->argv[0], strerror(err));
	_exit(err == ENOENT ? 127 : 126);
}

static long long now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static size_t open_power_buttons(struct pollfd *pfd, size_t max)
{
	size_t n = 0;
	DIR *d = opendir("/dev/input");
	struct dirent *e;
	while (d && (e = readdir(d)) && n < max) {
		if (strncmp(e->d_name, "event", 5))
			continue;
		char path[300];
		snprintf(path, sizeof path, "/dev/input/%s", e->d_name);
		int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
		if (fd >= 0)
			pfd[n++] = (struct pollfd){.fd = fd, .events = POLLIN};
	}
	if (d)
		closedir(d);
	return n;
}

static int power_button_pressed(int fd)
{
	struct input_event ev[16];
	ssize_t n = read(fd, ev, sizeof ev);
	for (ssize_t i = 0; n > 0 && i < n / (ssize_t)sizeof *ev; i++)
		if (ev[i].type == EV_KEY && ev[i].code == KEY_POWER && ev[i].value == 1)
			return 1;
	return 0;
}

/* -- exec health checks ------------------------------------------------------------ */

static _Noreturn void check_child(const struct config *c, const struct check *k,
				  const struct creds *cr, char **env)
{
	/* Its output is not the workload's: the console only gets the result line. */
	int null = open("/dev/null", O_RDWR | O_CLOEXEC);
	if (null < 0 || dup2(null, 0) < 0 || dup2(null, 1) < 0 || dup2(null, 2) < 0)
		_exit(126);
	become_workload(c, cr);
	environ = env;
	execvp(k->argv[0], k->argv);
	_exit(errno == ENOENT ? 127 : 126);
}

static void start_check(struct config *c, size_t i, const struct creds *cr, char **env,
			long long now)
{
	struct check *k = &c->checks[i];
	long every = k->passed || k->interval_ms < CHECK_STARTUP_MS ? k->interval_ms : CHECK_STARTUP_MS;
	k->next_ms = now + every;
	pid_t pid = fork();
	if (pid < 0) {
		say("check %s %zu fail fork failed: %s", c->check_token, i, strerror(errno));
		return;
	}
	if (pid == 0)
		check_child(c, k, cr, env);
	k->pid = pid;
	k->kill_ms = now + k->timeout_ms;
	k->timed_out = 0;
}

/* A reaped process: when it is a running check, print its result. */
static void check_done(struct config *c, pid_t pid, int st)
{
	for (size_t i = 0; i < c->nchecks; i++) {
		struct check *k = &c->checks[i];
		if (k->pid != pid)
			continue;
		k->pid = 0;
		if (k->timed_out) {
			say("check %s %zu fail timeout", c->check_token, i);
		} else if (WIFEXITED(st) && WEXITSTATUS(st) == 0) {
			k->passed = 1;
			say("check %s %zu ok", c->check_token, i);
		} else if (WIFSIGNALED(st)) {
			say("check %s %zu fail signal %d", c->check_token, i, WTERMSIG(st));
		} else {
			say("check %s %zu fail status %d", c->check_token, i, WEXITSTATUS(st));
		}
		return;
	}
}

/* Kill the checks past their timeout; start those due (none once stopping). */
static void run_checks(struct config *c, const struct creds *cr, char **env, int stopping)
{
	long long now = now_ms();
	for (size_t i = 0; i < c->nchecks; i++) {
		struct check *k = &c->checks[i];
		if (k->pid && !k->timed_out && now >= k->kill_ms) {
			/* The group too (a shell's children); the pid itself in case the child
			 * has not made its group yet. The result is printed once it is reaped. */
			kill(-k->pid, SIGKILL);
			kill(k->pid, SIGKILL);
			k->timed_out = 1;
		} else if (!k->pid && !stopping && now >= k->next_ms) {
			start_check(c, i, cr, env, now);
		}
	}
}

/* The next time run_checks has something to do, or `wake` if that is earlier (-1: none). */
static long long next_check_ms(const struct config *c, long long wake, int stopping)
{
	for (size_t i = 0; i < c->nchecks; i++) {
		const struct check *k = &c->checks[i];
		long long at = k->pid ? (k->timed_out ? -1 : k->kill_ms) : (stopping ? -1 : k->next_ms);
		if (at >= 0 && (wake < 0 || at < wake))
			wake = at;
	}
	return wake;
}

/* Supervise the command and run the checks; returns the command's wait status. */
static int supervise(pid_t child, struct config *c, const struct creds *cr, char **env,
		     struct pollfd *pfd, size_t nbuttons)
{
	sigset_t all;
	sigfillset(&all);
	int sfd = signalfd(-1, &all, SFD_CLOEXEC | SFD_NONBLOCK);
	if (sfd < 0)
		fail("signalfd: %s", strerror(errno));
	pfd[nbuttons] = (struct pollfd){.fd = sfd, .events = POLLIN};
	long long deadline = -1;
	int stopping = 0, status = 0, exited = 0;
	for (size_t i = 0; i < c->nchecks; i++)
		c->checks[i].next_ms = now_ms(); /* the first run right away */
	run_checks(c, cr, env, stopping);

	while (!exited) {
		int timeout = -1;
		long long wake = next_check_ms(c, deadline, stopping);
		if (wake >= 0) {
			long long left = wake - now_ms();
			timeout = left < 0 ? 0 : (int)(left > INT_MAX ? INT_MAX : left);
		}
		int n = poll(pfd, nbuttons + 1, timeout);
		if (n < 0 && errno != EINTR)
			fail("poll: %s", strerror(errno));
		int stop = 0;
		for (size_t i = 0; n > 0 && i < nbuttons; i++)
			if ((pfd[i].revents & POLLIN) && power_button_pressed(pfd[i].fd))
				stop = 1;
		struct signalfd_siginfo si;
		while (read(sfd, &si, sizeof si) == (ssize_t)sizeof si) {
			int sig = (int)si.ssi_signo;
			if (sig == SIGCHLD) {
				int st;
				pid_t p;
				while ((p = waitpid(-1, &st, WNOHANG)) > 0) {
					if (p == child) {
						status = st;
						exited = 1;
					} else {
						check_done(c, p, st);
					}
				}
			} else if (sig == SIGTERM || sig == SIGINT || sig == SIGPWR) {
				stop = 1;
			} else if (sig != SIGKILL && sig != SIGSTOP && sig != SIGTTIN && sig != SIGTTOU &&
				   sig != SIGTSTP && sig != SIGPIPE && sig != SIGALRM) {
				kill(child, sig); /* HUP, USR1, USR2, QUIT, WINCH, ...: pass through */
			}
		}
		if (stop && !stopping && !exited) {
			stopping = 1;
			say("stopping: sending signal %d, SIGKILL in %ld ms", c->kill_signal, c->kill_timeout_ms);
			kill(child, c->kill_signal);
			deadline = now_ms() + c->kill_timeout_ms;
		}
		if (!exited && deadline >= 0 && now_ms() >= deadline) {
			say("kill timeout: sending SIGKILL");
			kill(child, SIGKILL);
			deadline = -1;
		}
		if (!exited)
			run_checks(c, cr, env, stopping);
	}
	close(sfd);
	return status;
}

/* Kill and reap whatever the command left behind. */
static void reap_all(void)
{
	kill(-1, SIGKILL);
	long long until = now_ms() + 2000;
	while (now_ms() < until) {
		pid_t p = waitpid(-1, NULL, WNOHANG);
		if (p < 0 && errno == ECHILD)
			return;
		if (p == 0)
			usleep(1000);
	}
}

static void unmount_all(const struct config *c)
{
	for (size_t i = c->nmounts; i-- > 0;)
		umount2(c->mounts[i].target, MNT_DETACH);
	sync();
	mount(NULL, "/", NULL, MS_REMOUNT | MS_RDONLY, NULL);
}

/* -- main ------------------------------------------------------------------------------- */

static int cmdline_has(const char *word)
{
	char buf[4096];
	int fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 0;
	ssize_t n = read(fd, buf, sizeof buf - 1);
	close(fd);
	if (n <= 0)
		return 0;
	buf[n] = '\0';
	char *save = NULL;
	for (char *w = strtok_r(buf, " \n", &save); w; w = strtok_r(NULL, " \n", &save))
		if (!strcmp(w, word))
			return 1;
	return 0;
}

int main(void)
{
	if (getpid() != 1) {
		fprintf(stderr, "ember-init: must run as PID 1 of a microVM\n");
		return 2;
	}
	/* Every signal arrives through signalfd in supervise(); none may kill PID 1. */
	sigset_t all;
	sigfillset(&all);
	sigprocmask(SIG_BLOCK, &all, NULL);
	reboot(RB_DISABLE_CAD); /* Ctrl-Alt-Del becomes SIGINT: a stop, not a reset */

	mkdir("/dev", 0755);
	mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
	if (fcntl(STDERR_FILENO, F_GETFD) < 0) {
		int fd = open("/dev/console", O_RDWR | O_NOCTTY);
		for (int i = 0; fd >= 0 && i < 3; i++)
			if (fd != i)
				dup2(fd, i);
		if (fd > 2)
			close(fd);
	}
	mkdir("/proc", 0555);
	mkdir("/sys", 0555);
	if (mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) ||
	    mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL))
		fail("mount /proc or /sys: %s", strerror(errno));

	load_modules();
	if (cmdline_has("ember.probe")) {
		/* The VMM's acceleration probe: the kernel booted and ran us. */
		say("probe ok");
		power_off();
	}

	char config_dev[300];
	char *text = find_config(config_dev, sizeof config_dev);
	struct config c;
	parse_config(&c, text);

	mkdir(NEWROOT, 0755);
	struct mnt root = c.root;
	root.target = "";
	do_mount(&root, NEWROOT);
	for (size_t i = 0; i < c.nmounts; i++)
		do_mount(&c.mounts[i], NEWROOT);

	setup_network(&c);
	if (c.hostname && sethostname(c.hostname, strlen(c.hostname)))
		fail("sethostname: %s", strerror(errno));

	struct pollfd pfd[MAX_EVDEV + 1];
	size_t nbuttons = open_power_buttons(pfd, MAX_EVDEV);

	switch_root();
	finish_dev();
	/* The workload has no business reading the config drive (devtmpfs makes the node
	 * root-only; without it even root must know to mknod): it holds the check token. */
	if (unlink(config_dev))
		say("warning: remove %s: %s", config_dev, strerror(errno));
	write_resolv_conf(&c);

	struct creds cr;
	resolve_user(c.user, &cr);
	place_secrets(&c, &cr);
	mkdir_p(c.workdir, 0755);
	struct rlimit nofile = {1048576, 1048576};
	setrlimit(RLIMIT_NOFILE, &nofile);
	char **env = final_env(&c, &cr);

	pid_t child = fork();
	if (child < 0)
		fail("fork: %s", strerror(errno));
	if (child == 0)
		exec_child(&c, &cr, env);

	int status = supervise(child, &c, &cr, env, pfd, nbuttons);
	reap_all();
	unmount_all(&c);
	if (WIFSIGNALED(status))
		say("exit status %d (signal %d)", 128 + WTERMSIG(status), WTERMSIG(status));
	else
		say("exit status %d", WEXITSTATUS(status));
	power_off();
}
