/* A post-login load client in C: one thread, epoll, N logins in flight.
 *
 * Each login is what tests/harness/postlogin.py send_request does, as
 * Dovecot's mail process does it: connect to the UNIX socket, ONE sendmsg()
 * with the request and ONE passed fd (SCM_RIGHTS, the far end of a
 * socketpair; our copy is closed right after the send), read the reply until
 * LF or EOF, close. A reply ending in LF is a login; anything else (refused,
 * ENOENT, EAGAIN on a full backlog, reset, EOF without LF, no reply within
 * the per-login timeout) is a failure, and the run goes on.
 *
 * Usernames are "<before>W-I<after>": Python builds the request once
 * (app.protocol.build_request) around a marker and passes the bytes before
 * and after "W-I" (worker number, its login number) in hex; digits and '-'
 * need no tab-escaping.
 *
 *   postlogin_load -c N (-t SECONDS | -n COUNT) -b BEFORE_HEX -a AFTER_HEX
 *                  [-T LOGIN_TIMEOUT] [-o LATENCY_FILE] SOCKET_PATH
 *
 * -n COUNT: COUNT / N logins per worker (as bench/load.py drive). With -t,
 * logins are started until SECONDS have passed; those in flight finish.
 * Prints one line: logins=L failures=F seconds=S p50=.. p95=.. p99=.. (ms,
 * as bench.load.Run.pct picks them) cpu=C (this process's user + system CPU
 * seconds from start-up on, by getrusage) and writes every successful
 * login's latency (seconds, native doubles, from socket() to close) to
 * LATENCY_FILE.
 * Built by bench/handler.py at bench time; never committed as a binary.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

enum state { IDLE, CONNECTING, SENDING, READING, DONE };

struct slot {
    int worker;
    long i;                 /* this worker's next login number */
    enum state st;
    int conn, near, far;    /* -1 when closed */
    double t0;
    size_t len, sent;
    unsigned char last;     /* last reply byte received */
    char *req;
};

static struct sockaddr_un addr;
static socklen_t addrlen;
static int ep;
static unsigned char *before, *after;
static size_t before_len, after_len;
static double login_timeout = 20.0, deadline = 1e300;
static long per_worker = -1;
static long logins, failures;
static double *lat;
static size_t nlat, caplat;
static struct slot **pending, **pending_next;
static size_t npending, npending_next;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
    perror(what);
    exit(2);
}

static unsigned char *unhex(const char *hex, size_t *len)
{
    size_t n = strlen(hex);
    if (n % 2) {
        fprintf(stderr, "odd hex length\n");
        exit(2);
    }
    unsigned char *out = malloc(n / 2 + 1);
    if (!out)
        die("malloc");
    for (size_t k = 0; k < n / 2; k++) {
        unsigned v;
        if (!isxdigit((unsigned char)hex[2 * k]) || !isxdigit((unsigned char)hex[2 * k + 1])
            || sscanf(hex + 2 * k, "%2x", &v) != 1) {
            fprintf(stderr, "bad hex at %zu\n", 2 * k);
            exit(2);
        }
        out[k] = (unsigned char)v;
    }
    *len = n / 2;
    return out;
}

static void closefd(int *fd)
{
    if (*fd >= 0) {
        close(*fd);
        *fd = -1;
    }
}

/* End the login in flight: count it, close everything, queue the next one. */
static void finish(struct slot *s, int ok)
{
    closefd(&s->far);
    closefd(&s->conn);      /* also leaves the epoll set */
    closefd(&s->near);
    if (ok) {
        logins++;
        if (nlat == caplat) {
            caplat = caplat ? 2 * caplat : 65536;
            lat = realloc(lat, caplat * sizeof *lat);
            if (!lat)
                die("realloc");
        }
        lat[nlat++] = now() - s->t0;
    } else {
        failures++;
    }
    s->i++;
    s->st = IDLE;
    pending_next[npending_next++] = s;
}

static void watch(struct slot *s, uint32_t events, int op)
{
    struct epoll_event ev = {.events = events, .data.ptr = s};
    if (epoll_ctl(ep, op, s->conn, &ev) < 0)
        die("epoll_ctl");
}

static void try_send(struct slot *s, int registered)
{
    struct iovec iov = {.iov_base = s->req + s->sent, .iov_len = s->len - s->sent};
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(sizeof(int))];
    } anc;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    if (s->sent == 0) {
        memset(&anc, 0, sizeof anc);
        msg.msg_control = anc.buf;
        msg.msg_controllen = sizeof anc.buf;
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &s->far, sizeof(int));
    }
    ssize_t n = sendmsg(s->conn, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) {
            s->st = SENDING;
            watch(s, EPOLLOUT, registered ? EPOLL_CTL_MOD : EPOLL_CTL_ADD);
            return;
        }
        finish(s, 0);       /* EPIPE, ECONNRESET, ...: closed on us */
        return;
    }
    if (s->sent == 0)
        closefd(&s->far);   /* the fd went with the request; drop our copy */
    s->sent += (size_t)n;
    if (s->sent < s->len) {
        s->st = SENDING;
        watch(s, EPOLLOUT, registered ? EPOLL_CTL_MOD : EPOLL_CTL_ADD);
        return;
    }
    s->st = READING;
    watch(s, EPOLLIN, registered ? EPOLL_CTL_MOD : EPOLL_CTL_ADD);
}

/* Connected: the "client connection" pair whose far end is passed, then the request. */
static void pair_and_send(struct slot *s, int registered)
{
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) {
        finish(s, 0);
        return;
    }
    s->near = sv[0];
    s->far = sv[1];
    try_send(s, registered);
}

/* Start the slot's next login, or retire the slot. */
static void start(struct slot *s)
{
    double t = now();
    if (t >= deadline || (per_worker >= 0 && s->i >= per_worker)) {
        s->st = DONE;
        return;
    }
    s->t0 = t;
    s->sent = 0;
    s->last = 0;
    memcpy(s->req, before, before_len);
    int n = sprintf(s->req + before_len, "%d-%ld", s->worker, s->i);
    memcpy(s->req + before_len + n, after, after_len);
    s->len = before_len + (size_t)n + after_len;

    s->conn = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (s->conn < 0) {
        finish(s, 0);
        return;
    }
    if (connect(s->conn, (struct sockaddr *)&addr, addrlen) < 0) {
        if (errno == EINPROGRESS) {     /* the socketpair is made once connected */
            s->st = CONNECTING;
            watch(s, EPOLLOUT, EPOLL_CTL_ADD);
        } else {
            finish(s, 0);   /* ECONNREFUSED, ENOENT, EAGAIN (full backlog), ... */
        }
        return;
    }
    pair_and_send(s, 0);
}

static void on_event(struct slot *s, uint32_t events)
{
    if (s->st == CONNECTING) {
        int err = 0;
        socklen_t l = sizeof err;
        if (getsockopt(s->conn, SOL_SOCKET, SO_ERROR, &err, &l) < 0 || err) {
            finish(s, 0);
            return;
        }
        pair_and_send(s, 1);
    } else if (s->st == SENDING) {
        try_send(s, 1);
    } else if (s->st == READING) {
        static unsigned char buf[65536];
        for (;;) {
            ssize_t n = recv(s->conn, buf, sizeof buf, MSG_DONTWAIT);
            if (n > 0) {
                s->last = buf[n - 1];
                if (s->last == '\n') {
                    finish(s, 1);
                    return;
                }
                continue;
            }
            if (n == 0) {
                finish(s, 0);   /* EOF without a reply line */
                return;
            }
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                if (events & (EPOLLHUP | EPOLLERR)) {
                    finish(s, 0);
                    return;
                }
                return;
            }
            finish(s, 0);       /* ECONNRESET, ... */
            return;
        }
    }
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double pct(double p)
{
    if (!nlat)
        return -1;
    size_t k = (size_t)(p / 100 * nlat);
    return lat[k < nlat ? k : nlat - 1] * 1000;
}

int main(int argc, char **argv)
{
    int conc = 1;
    double seconds = -1;
    long count = -1;
    const char *out = NULL, *bhex = NULL, *ahex = NULL;
    int opt;
    while ((opt = getopt(argc, argv, "c:t:n:b:a:T:o:")) != -1) {
        switch (opt) {
        case 'c': conc = atoi(optarg); break;
        case 't': seconds = atof(optarg); break;
        case 'n': count = atol(optarg); break;
        case 'b': bhex = optarg; break;
        case 'a': ahex = optarg; break;
        case 'T': login_timeout = atof(optarg); break;
        case 'o': out = optarg; break;
        default: goto usage;
        }
    }
    if (optind != argc - 1 || conc < 1 || (seconds < 0 && count < 0) || !bhex || !ahex)
        goto usage;
    const char *path = argv[optind];
    if (strlen(path) >= sizeof addr.sun_path) {
        fprintf(stderr, "socket path too long\n");
        return 2;
    }
    addr.sun_family = AF_UNIX;
    strcpy(addr.sun_path, path);
    addrlen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + strlen(path) + 1);
    before = unhex(bhex, &before_len);
    after = unhex(ahex, &after_len);
    if (count >= 0)
        per_worker = count / conc;

    /* three fds per login in flight */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < (rlim_t)conc * 3 + 16) {
        rl.rlim_cur = rl.rlim_max;
        if (setrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur < (rlim_t)conc * 3 + 16) {
            fprintf(stderr, "too few file descriptors for %d logins in flight\n", conc);
            exit(2);
        }
    }
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0)
        die("epoll_create1");
    struct slot *slots = calloc((size_t)conc, sizeof *slots);
    pending = calloc((size_t)conc, sizeof *pending);
    pending_next = calloc((size_t)conc, sizeof *pending_next);
    struct epoll_event *evs = calloc((size_t)conc, sizeof *evs);
    if (!slots || !pending || !pending_next || !evs)
        die("calloc");
    for (int k = 0; k < conc; k++) {
        slots[k] = (struct slot){.worker = k, .conn = -1, .near = -1, .far = -1,
                                 .req = malloc(before_len + after_len + 48)};
        if (!slots[k].req)
            die("malloc");
        pending_next[npending_next++] = &slots[k];
    }

    double t_start = now(), last_scan = t_start;
    if (seconds >= 0)
        deadline = t_start + seconds;
    for (;;) {
        /* start what finished last time round (failed starts wait a turn, so
           a dead socket cannot starve the logins in flight) */
        struct slot **tmp = pending;
        pending = pending_next;
        pending_next = tmp;
        npending = npending_next;
        npending_next = 0;
        for (size_t k = 0; k < npending; k++)
            start(pending[k]);
        int active = 0;
        for (int k = 0; k < conc; k++)
            active += slots[k].st != DONE;
        if (!active)
            break;
        int n = epoll_wait(ep, evs, conc, npending_next ? 0 : 10);
        if (n < 0 && errno != EINTR)
            die("epoll_wait");
        for (int k = 0; k < n; k++)
            on_event(evs[k].data.ptr, evs[k].events);
        double t = now();
        if (t - last_scan >= 0.01) {
            last_scan = t;
            for (int k = 0; k < conc; k++) {
                struct slot *s = &slots[k];
                if ((s->st == CONNECTING || s->st == SENDING || s->st == READING)
                    && t - s->t0 > login_timeout)
                    finish(s, 0);
            }
        }
    }
    double elapsed = now() - t_start;

    if (out) {
        FILE *f = fopen(out, "wb");
        if (!f || (nlat && fwrite(lat, sizeof *lat, nlat, f) != nlat) || fclose(f))
            die(out);
    }
    qsort(lat, nlat, sizeof *lat, cmp_double);
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru))
        die("getrusage");
    double cpu = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6
                 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
    printf("logins=%ld failures=%ld seconds=%.6f p50=%.3f p95=%.3f p99=%.3f cpu=%.6f\n",
           logins, failures, elapsed, pct(50), pct(95), pct(99), cpu);
    return 0;

usage:
    fprintf(stderr, "usage: %s -c N (-t SECONDS | -n COUNT) -b BEFORE_HEX -a AFTER_HEX "
                    "[-T LOGIN_TIMEOUT] [-o LATENCY_FILE] SOCKET_PATH\n", argv[0]);
    return 2;
}
