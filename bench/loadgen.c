/*
 * loadgen: a small HTTP/1.1-over-mutual-TLS load generator for bench/poll.py.
 *
 * One thread, epoll, N connections. Each connection is one simulated device
 * with its own client certificate; it sends GET <path> with If-None-Match set
 * to the last ETag it was given (none at first, as a new device), and
 * X-Skylift-State: idle. Three modes:
 *
 *   keepalive  every connection sends its requests one after another on one
 *              TLS connection.
 *   reconnect  every request opens a new TCP + TLS connection with
 *              "Connection: close", resuming the device's last TLS session
 *              (the ticket the server sent on the previous connection), as a
 *              fleet that polls every few minutes does. The server closes the
 *              connection after the answer, so the client does not collect
 *              TIME_WAIT sockets.
 *   full       as reconnect, but never resuming: a full handshake per poll.
 *
 * The measured window opens WARMUP_S after every connection finished its
 * first request (a new device's first poll: full handshake, identity check,
 * a 200), or after 60 s if some never do ("all_warm": false). Requests started
 * before it opens are not counted. Latency is from the start of a request (in
 * the reconnect modes: from connect(), handshake included) to the last byte
 * of its answer, in a 10 us histogram.
 *
 * Prints one JSON object on stdout. Usage:
 *   loadgen HOST PORT PATH MODE CONNECTIONS SECONDS WARMUP_S CA_PEM CERT_DIR DEVICES
 * where CERT_DIR holds dev-<i>.pem and dev-<i>.key for i in 0..DEVICES-1 and
 * connection c is device c % DEVICES.
 *
 * Written for Skylift; uses only libc and OpenSSL.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BUCKET_US 10
#define BUCKETS 1000000 /* 10 s at 10 us */
#define RBUF 16384
#define ETAG_MAX 128
#define STALL_S 10.0 /* a connection with no progress this long is an error */
#define MAX_WARMUP_S 60.0

enum state { CONNECTING, HANDSHAKE, WRITING, READING, DRAINING };

struct device {
    SSL_CTX *ctx;
    SSL_SESSION *session; /* the newest ticket the server gave this device */
    char etag[ETAG_MAX];
};

struct conn {
    int fd;
    SSL *ssl;
    struct device *dev;
    enum state st;
    double started;  /* this request's start */
    double progress; /* last time something happened */
    int warm;        /* finished a first request */
    char req[1024];
    int req_len, req_off;
    char buf[RBUF];
    int buf_len;
};

static int keepalive, resume;
static int cold; /* connections that have not finished their first request yet */
static struct sockaddr_in addr;
static const char *host, *path;
static int epfd;
static double t_begin, t_warm_end, t_end;
static uint32_t *hist;
static uint64_t n_done, n_304, n_200, n_other, n_errors, n_handshakes, n_resumed;
static uint64_t n_bytes;
static char first_error[256];

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    fprintf(stderr, "loadgen: %s\n", what);
    ERR_print_errors_fp(stderr);
    exit(2);
}

static int new_session(SSL *ssl, SSL_SESSION *session) {
    struct device *dev = SSL_get_app_data(ssl);
    if (dev->session) SSL_SESSION_free(dev->session);
    dev->session = session; /* we keep the reference OpenSSL gives us */
    return 1;
}

static void note_error(const char *what) {
    if (t_warm_end <= now_s()) n_errors++;
    if (!first_error[0]) {
        unsigned long e = ERR_peek_last_error();
        snprintf(first_error, sizeof first_error, "%s%s%s (errno %d)", what, e ? ": " : "",
                 e ? ERR_reason_error_string(e) : "", errno);
    }
    ERR_clear_error();
}

static void watch(struct conn *c, uint32_t events, int op) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(epfd, op, c->fd, &ev) < 0) die("epoll_ctl");
}

static void build_request(struct conn *c) {
    char inm[ETAG_MAX + 32] = "";
    if (c->dev->etag[0]) snprintf(inm, sizeof inm, "If-None-Match: %s\r\n", c->dev->etag);
    c->req_len = snprintf(c->req, sizeof c->req,
                          "GET %s HTTP/1.1\r\nHost: %s\r\nX-Skylift-State: idle\r\n%s%s\r\n", path,
                          host, inm, keepalive ? "" : "Connection: close\r\n");
    c->req_off = 0;
    c->buf_len = 0;
}

static void close_conn(struct conn *c) {
    if (c->ssl) {
        SSL_free(c->ssl);
        c->ssl = NULL;
    }
    if (c->fd >= 0) {
        close(c->fd);
        c->fd = -1;
    }
}

static void start_conn(struct conn *c, double t) {
    close_conn(c);
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0) die("socket");
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->ssl = SSL_new(c->dev->ctx);
    SSL_set_app_data(c->ssl, c->dev);
    SSL_set_fd(c->ssl, c->fd);
    SSL_set_tlsext_host_name(c->ssl, host);
    if (resume && c->dev->session) SSL_set_session(c->ssl, c->dev->session);
    c->started = c->progress = t;
    build_request(c);
    int r = connect(c->fd, (struct sockaddr *)&addr, sizeof addr);
    if (r < 0 && errno != EINPROGRESS) {
        note_error("connect");
        c->st = CONNECTING;
        watch(c, EPOLLOUT, EPOLL_CTL_ADD);
        return;
    }
    c->st = CONNECTING;
    watch(c, EPOLLOUT, EPOLL_CTL_ADD);
}

static void restart(struct conn *c, double t) {
    /* after an error: a fresh connection (and a fresh start time) */
    if (c->fd >= 0) epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    start_conn(c, t);
}

static double warmup_s, seconds_s;

static void record(struct conn *c, int status, double t) {
    if (!c->warm) {
        /* The window opens once every device has made its first poll (full
         * handshake, identity check, first answer) and the warm-up passed. */
        c->warm = 1;
        if (--cold == 0 && t_warm_end > t + warmup_s) {
            t_warm_end = t + warmup_s;
            t_end = t_warm_end + seconds_s;
        }
    }
    if (c->started < t_warm_end || t > t_end) return;
    n_done++;
    if (status == 304)
        n_304++;
    else if (status == 200)
        n_200++;
    else
        n_other++;
    uint64_t b = (uint64_t)((t - c->started) * 1e6 / BUCKET_US);
    hist[b < BUCKETS ? b : BUCKETS - 1]++;
}

/* Parses a complete answer in c->buf; returns its total length or 0 if incomplete. */
static int parse_answer(struct conn *c, int *status) {
    char *end = memmem(c->buf, c->buf_len, "\r\n\r\n", 4);
    if (!end) return 0;
    int head = (int)(end - c->buf) + 4;
    if (sscanf(c->buf, "HTTP/1.%*d %d", status) != 1) return -1;
    long length = 0;
    char *line = memchr(c->buf, '\n', head);
    while (line && line < c->buf + head) {
        line++;
        if (!strncasecmp(line, "content-length:", 15)) length = strtol(line + 15, NULL, 10);
        if (!strncasecmp(line, "etag:", 5)) {
            char *v = line + 5, *e = memchr(v, '\r', c->buf + head - v);
            while (*v == ' ') v++;
            if (e && e - v < ETAG_MAX) {
                memcpy(c->dev->etag, v, e - v);
                c->dev->etag[e - v] = 0;
            }
        }
        line = memchr(line, '\n', c->buf + head - line);
    }
    if (*status == 304 || *status == 204) length = 0;
    if (head + length > RBUF) return -1;
    return c->buf_len >= head + length ? head + (int)length : 0;
}

static void step(struct conn *c, double t) {
    for (;;) {
        int r = 0;
        switch (c->st) {
        case CONNECTING: {
            int err = 0;
            socklen_t len = sizeof err;
            getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
            if (err) {
                errno = err;
                note_error("connect");
                restart(c, t);
                return;
            }
            c->st = HANDSHAKE;
            continue;
        }
        case HANDSHAKE:
            r = SSL_connect(c->ssl);
            if (r == 1) {
                if (t >= t_warm_end) {
                    n_handshakes++;
                    if (SSL_session_reused(c->ssl)) n_resumed++;
                }
                c->st = WRITING;
                continue;
            }
            break;
        case WRITING:
            r = SSL_write(c->ssl, c->req + c->req_off, c->req_len - c->req_off);
            if (r > 0) {
                c->req_off += r;
                if (c->req_off == c->req_len) c->st = READING;
                continue;
            }
            break;
        case READING: {
            r = SSL_read(c->ssl, c->buf + c->buf_len, RBUF - c->buf_len);
            if (r > 0) {
                c->buf_len += r;
                n_bytes += r;
                int status = 0, n = parse_answer(c, &status);
                if (n < 0) {
                    note_error("unparsable answer");
                    restart(c, t);
                    return;
                }
                if (n == 0) continue;
                record(c, status, t);
                if (t >= t_end) return;
                if (keepalive) {
                    c->started = t;
                    build_request(c);
                    c->st = WRITING;
                } else {
                    c->st = DRAINING; /* wait for the server to close first */
                }
                continue;
            }
            break;
        }
        case DRAINING:
            r = SSL_read(c->ssl, c->buf, RBUF);
            if (r > 0) continue;
            {
                int e = SSL_get_error(c->ssl, r);
                if (e == SSL_ERROR_WANT_READ) {
                    watch(c, EPOLLIN, EPOLL_CTL_MOD);
                    return;
                }
            }
            /* Closed by the server (close_notify or EOF). Answer with our
             * close_notify: OpenSSL marks the session of a connection freed
             * without one as not resumable. Then the next poll, on a new
             * connection. */
            ERR_clear_error();
            SSL_shutdown(c->ssl);
            ERR_clear_error();
            epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
            start_conn(c, t);
            return;
        }
        int e = SSL_get_error(c->ssl, r);
        if (e == SSL_ERROR_WANT_READ) {
            watch(c, EPOLLIN, EPOLL_CTL_MOD);
            return;
        }
        if (e == SSL_ERROR_WANT_WRITE) {
            watch(c, EPOLLOUT, EPOLL_CTL_MOD);
            return;
        }
        note_error(c->st == HANDSHAKE ? "handshake" : c->st == WRITING ? "write" : "read");
        restart(c, t);
        return;
    }
}

static SSL_CTX *device_ctx(const char *ca, const char *dir, int i) {
    char cert[4096], key[4096];
    snprintf(cert, sizeof cert, "%s/dev-%d.pem", dir, i);
    snprintf(key, sizeof key, "%s/dev-%d.key", dir, i);
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx) die("SSL_CTX_new");
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    if (SSL_CTX_load_verify_locations(ctx, ca, NULL) != 1) die("CA file");
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    if (SSL_CTX_use_certificate_file(ctx, cert, SSL_FILETYPE_PEM) != 1) die(cert);
    if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1) die(key);
    /* Sessions go to the device through the callback, never to OpenSSL's cache. */
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
    SSL_CTX_sess_set_new_cb(ctx, new_session);
    return ctx;
}

static uint64_t percentile_us(uint64_t total, double p) {
    uint64_t want = (uint64_t)(total * p), seen = 0;
    if (want >= total && total) want = total - 1;
    for (uint64_t b = 0; b < BUCKETS; b++) {
        seen += hist[b];
        if (seen > want) return (b + 1) * BUCKET_US;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 11) {
        fprintf(stderr,
                "usage: loadgen HOST PORT PATH keepalive|reconnect|full CONNECTIONS SECONDS WARMUP_S "
                "CA_PEM CERT_DIR DEVICES\n");
        return 2;
    }
    host = argv[1];
    int port = atoi(argv[2]);
    path = argv[3];
    keepalive = !strcmp(argv[4], "keepalive");
    resume = !strcmp(argv[4], "reconnect");
    if (!keepalive && !resume && strcmp(argv[4], "full"))
        die("mode is keepalive, reconnect or full");
    int nconn = atoi(argv[5]), ndev = atoi(argv[10]);
    seconds_s = atof(argv[6]);
    warmup_s = atof(argv[7]);
    if (nconn < 1 || ndev < 1 || seconds_s <= 0 || warmup_s < 0) die("bad arguments");

    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) die("HOST must be an IPv4 address");

    hist = calloc(BUCKETS, sizeof *hist);
    struct device *devs = calloc(ndev, sizeof *devs);
    struct conn *conns = calloc(nconn, sizeof *conns);
    if (!hist || !devs || !conns) die("out of memory");
    for (int i = 0; i < ndev; i++) devs[i].ctx = device_ctx(argv[8], argv[9], i);

    epfd = epoll_create1(0);
    t_begin = now_s();
    /* Until every connection is warm; at most MAX_WARMUP_S. */
    cold = nconn;
    t_warm_end = t_begin + MAX_WARMUP_S;
    t_end = t_warm_end + seconds_s;
    for (int i = 0; i < nconn; i++) {
        conns[i].fd = -1;
        conns[i].dev = &devs[i % ndev];
        start_conn(&conns[i], t_begin);
    }
    struct epoll_event events[512];
    double last_sweep = t_begin;
    for (;;) {
        int n = epoll_wait(epfd, events, 512, 100);
        double t = now_s();
        if (t >= t_end) break;
        for (int i = 0; i < n; i++) step(events[i].data.ptr, t);
        if (t - last_sweep > 1.0) {
            last_sweep = t;
            for (int i = 0; i < nconn; i++)
                if (t - conns[i].progress > STALL_S) {
                    note_error("stalled");
                    restart(&conns[i], t);
                }
        }
        for (int i = 0; i < n; i++) ((struct conn *)events[i].data.ptr)->progress = t;
    }
    double elapsed = (t_end < now_s() ? t_end : now_s()) - t_warm_end;
    printf("{\"mode\": \"%s\", \"connections\": %d, \"warmup_s\": %.3f, \"all_warm\": %s, "
           "\"seconds\": %.3f, \"requests\": %lu, "
           "\"rps\": %.1f, \"status_304\": %lu, \"status_200\": %lu, \"status_other\": %lu, "
           "\"errors\": %lu, \"handshakes\": %lu, \"resumed\": %lu, \"p50_us\": %lu, "
           "\"p90_us\": %lu, \"p99_us\": %lu, \"bytes\": %lu, \"first_error\": \"%s\"}\n",
           argv[4], nconn, t_warm_end - t_begin, cold ? "false" : "true", elapsed, n_done, n_done / elapsed, n_304, n_200, n_other, n_errors,
           n_handshakes, n_resumed, percentile_us(n_done, 0.5), percentile_us(n_done, 0.9),
           percentile_us(n_done, 0.99), n_bytes, first_error);
    for (int i = 0; i < nconn; i++) close_conn(&conns[i]);
    return 0;
}
