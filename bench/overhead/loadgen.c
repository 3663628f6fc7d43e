/*
 * loadgen.c - a small open-loop (fixed-rate) HTTP/1.1 load generator for latency
 * measurement, written for the Aiguillage overhead benchmark (bench/overhead).
 *
 * Why not wrk?  wrk is closed-loop: each connection waits for its answer before it
 * sends the next request, so a slow answer delays the requests behind it and the
 * latency it reports hides the queueing ("coordinated omission").  wrk2 fixes that but
 * is not packaged in Debian.  This tool sends request i at t0 + i/rate whatever happens
 * to earlier requests, on a pool of keep-alive connections that grows on demand (up to
 * --conns), and measures each request's latency from the moment it was *scheduled*, so
 * queueing anywhere (client, proxy, engine) shows up in the numbers.
 *
 * It also measures the time to the first response byte, the service time (from the
 * actual write), how late the generator itself was on its schedule (send lag: proves it
 * is not the bottleneck), and counts SSE `data:` events in the bodies (de-chunked).
 *
 * Build:  cc -O2 -o loadgen loadgen.c -lm
 * Usage:  loadgen --port P --path /v1/chat/completions --body-file F
 *                 [--host 127.0.0.1] [--header 'Authorization: Bearer K']...
 *                 [--rate R (0 = closed loop)] [--duration S] [--warmup S]
 *                 [--conns N] [--grace S]
 * Prints one JSON object on stdout.  Only IPv4 literal hosts; meant for 127.0.0.1.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONNS 1024
#define HDR_MAX 16384
#define RBUF 65536

enum { C_CLOSED = 0, C_CONNECTING, C_IDLE, C_BUSY };
enum { B_HEADERS = 0, B_LENGTH, B_CHUNK_SIZE, B_CHUNK_EXT, B_CHUNK_DATA, B_CHUNK_CR, B_CHUNK_LF,
       B_TRAILER_START, B_TRAILER_LINE, B_TRAILER_END, B_UNTIL_CLOSE };

typedef struct {
    int fd, state, id;
    int has_req;           /* a request is assigned to this connection */
    double t_intended, t_sent, t_first;
    size_t woff;
    int want_out;
    /* response parsing */
    char hdr[HDR_MAX];
    size_t hlen;
    int bstate, status, conn_close, chunked;
    long remaining;        /* content-length left, or chunk bytes left */
    long chunk_size;
    int dmatch;            /* progress matching "data:" */
    long events;
    long body_bytes;
} conn_t;

static conn_t conns[MAX_CONNS];
static int nconns_open = 0, max_conns = 64;
static int epfd, tfd;
static struct sockaddr_in addr;
static char *req_buf;
static size_t req_len;

/* results */
static double *lat, *svc, *ttfb, *lag;
static long *evs;
static long nres = 0, cap_res = 0;
static long n_sent = 0, n_done = 0, n_ok = 0, n_non2xx = 0, n_errors = 0, n_connects = 0;
static long n_measured_sent = 0;
static long total_events = 0, total_body = 0;
static double t_measure_start = 0, t_measure_end = 0;
static long max_backlog = 0;

/* backlog of scheduled-but-unsent request times (open loop, all connections busy) */
static double *backlog;
static long bl_head = 0, bl_tail = 0, bl_cap = 0;

static int closed_loop = 0;
static double stop_sending_at = 0;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void die(const char *m) { perror(m); exit(2); }

static void ep_set(conn_t *c, int out) {
    struct epoll_event ev = {.events = EPOLLIN | (out ? EPOLLOUT : 0), .data.u32 = (uint32_t)c->id};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0) die("epoll_ctl mod");
    c->want_out = out;
}

static void reset_parse(conn_t *c) {
    c->hlen = 0; c->bstate = B_HEADERS; c->status = 0; c->conn_close = 0; c->chunked = 0;
    c->remaining = -1; c->chunk_size = 0; c->dmatch = 0; c->events = 0; c->body_bytes = 0;
}

static int open_conn(conn_t *c) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    int r = connect(fd, (struct sockaddr *)&addr, sizeof addr);
    if (r < 0 && errno != EINPROGRESS) { close(fd); return -1; }
    c->fd = fd; c->state = C_CONNECTING; c->has_req = 0; c->woff = 0;
    reset_parse(c);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.u32 = (uint32_t)c->id};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl add");
    c->want_out = 1;
    nconns_open++; n_connects++;
    return 0;
}

static void close_conn(conn_t *c) {
    if (c->state == C_CLOSED) return;
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1; c->state = C_CLOSED; c->has_req = 0;
    nconns_open--;
}

static void try_write(conn_t *c) {
    while (c->woff < req_len) {
        ssize_t w = write(c->fd, req_buf + c->woff, req_len - c->woff);
        if (w < 0) {
            if (errno == EAGAIN) { if (!c->want_out) ep_set(c, 1); return; }
            return; /* error shows up on read */
        }
        c->woff += (size_t)w;
    }
    if (c->want_out) ep_set(c, 0);
}

static void start_request(conn_t *c, double t_intended) {
    c->has_req = 1; c->t_intended = t_intended; c->t_first = 0; c->woff = 0;
    reset_parse(c);
    if (c->state == C_CONNECTING) return; /* written once connected */
    c->state = C_BUSY;
    c->t_sent = now_s();
    n_sent++;
    if (t_intended >= t_measure_start) n_measured_sent++;
    try_write(c);
}

static void bl_push(double t) {
    if (bl_tail - bl_head >= bl_cap) { fprintf(stderr, "backlog overflow\n"); exit(2); }
    backlog[bl_tail % bl_cap] = t; bl_tail++;
    if (bl_tail - bl_head > max_backlog) max_backlog = bl_tail - bl_head;
}

/* find an idle connection (or open one) for a request scheduled at t */
static void dispatch(double t) {
    for (int i = 0; i < max_conns; i++)
        if (conns[i].state == C_IDLE) { start_request(&conns[i], t); return; }
    for (int i = 0; i < max_conns; i++)
        if (conns[i].state == C_CLOSED) {
            if (open_conn(&conns[i]) == 0) { start_request(&conns[i], t); return; }
            break;
        }
    bl_push(t);
}

static void record(conn_t *c, double t_done) {
    n_done++;
    int ok = c->status >= 200 && c->status < 300;
    if (ok) n_ok++; else n_non2xx++;
    total_events += c->events; total_body += c->body_bytes;
    if (!ok || c->t_intended < t_measure_start || c->t_intended >= t_measure_end) return;
    if (nres >= cap_res) return;
    lat[nres] = t_done - c->t_intended;
    svc[nres] = t_done - c->t_sent;
    ttfb[nres] = (c->t_first > 0 ? c->t_first : t_done) - c->t_sent;
    lag[nres] = c->t_sent - c->t_intended;
    evs[nres] = c->events;
    nres++;
}

/* connection is free again: next request from the backlog, closed loop, or idle */
static void conn_free(conn_t *c, double t) {
    c->has_req = 0;
    c->state = C_IDLE;
    if (bl_head < bl_tail) {
        double ti = backlog[bl_head % bl_cap]; bl_head++;
        start_request(c, ti);
    } else if (closed_loop && t < stop_sending_at) {
        start_request(c, t);
    }
}

/* a connection went away: keep the pipeline going on a fresh one if work is waiting */
static void after_close(double t) {
    if (bl_head < bl_tail) {
        double ti = backlog[bl_head % bl_cap]; bl_head++;
        dispatch(ti);
    } else if (closed_loop && t < stop_sending_at && n_errors < 1000) {
        dispatch(t);
    }
}

static void fail_conn(conn_t *c) {
    int had = c->has_req;
    close_conn(c);
    if (had) { n_errors++; n_done++; }
    after_close(now_s());
}

static inline void feed_events(conn_t *c, const char *p, size_t n) {
    c->body_bytes += (long)n;
    int m = c->dmatch;
    static const char pat[] = "data:";
    for (size_t i = 0; i < n; i++) {
        char ch = p[i];
        if (ch == pat[m]) { m++; if (m == 5) { c->events++; m = 0; } }
        else m = (ch == 'd') ? 1 : 0;
    }
    c->dmatch = m;
}

static int parse_headers(conn_t *c) {
    /* hdr holds everything up to and including \r\n\r\n */
    c->hdr[c->hlen] = 0;
    if (strncmp(c->hdr, "HTTP/1.", 7) != 0) return -1;
    c->status = atoi(c->hdr + 9);
    if (strncmp(c->hdr, "HTTP/1.0", 8) == 0) c->conn_close = 1;
    char *line = strstr(c->hdr, "\r\n");
    long cl = -1;
    while (line && line[2] != '\r') {
        line += 2;
        char *end = strstr(line, "\r\n");
        if (!end) break;
        if (strncasecmp(line, "content-length:", 15) == 0) cl = atol(line + 15);
        else if (strncasecmp(line, "transfer-encoding:", 18) == 0) {
            if (memmem(line, (size_t)(end - line), "chunked", 7)) c->chunked = 1;
        } else if (strncasecmp(line, "connection:", 11) == 0) {
            char *v = line + 11; while (*v == ' ') v++;
            if (strncasecmp(v, "close", 5) == 0) c->conn_close = 1;
        }
        line = end;
    }
    if (c->chunked) c->bstate = B_CHUNK_SIZE;
    else if (cl >= 0) { c->bstate = B_LENGTH; c->remaining = cl; }
    else c->bstate = B_UNTIL_CLOSE;
    return 0;
}

/* returns 1 when the response is complete, 0 if more is needed, -1 on parse error */
static int feed_body(conn_t *c, const char *p, size_t n, size_t *used) {
    size_t i = 0;
    while (i < n) {
        switch (c->bstate) {
        case B_LENGTH: {
            size_t take = (size_t)c->remaining < n - i ? (size_t)c->remaining : n - i;
            feed_events(c, p + i, take); i += take; c->remaining -= (long)take;
            if (c->remaining == 0) { *used = i; return 1; }
            break;
        }
        case B_UNTIL_CLOSE: feed_events(c, p + i, n - i); i = n; break;
        case B_CHUNK_SIZE: {
            char ch = p[i++];
            if (ch >= '0' && ch <= '9') c->chunk_size = c->chunk_size * 16 + (ch - '0');
            else if (ch >= 'a' && ch <= 'f') c->chunk_size = c->chunk_size * 16 + (ch - 'a' + 10);
            else if (ch >= 'A' && ch <= 'F') c->chunk_size = c->chunk_size * 16 + (ch - 'A' + 10);
            else if (ch == '\r') c->bstate = B_CHUNK_LF;
            else if (ch == ';' || ch == ' ') c->bstate = B_CHUNK_EXT;
            else return -1;
            break;
        }
        case B_CHUNK_EXT: if (p[i++] == '\r') c->bstate = B_CHUNK_LF; break;
        case B_CHUNK_LF:
            if (p[i++] != '\n') return -1;
            if (c->chunk_size == 0) c->bstate = B_TRAILER_START;
            else { c->remaining = c->chunk_size; c->bstate = B_CHUNK_DATA; }
            break;
        case B_CHUNK_DATA: {
            size_t take = (size_t)c->remaining < n - i ? (size_t)c->remaining : n - i;
            feed_events(c, p + i, take); i += take; c->remaining -= (long)take;
            if (c->remaining == 0) c->bstate = B_CHUNK_CR;
            break;
        }
        case B_CHUNK_CR:
            if (p[i] == '\r') { i++; break; }
            if (p[i++] != '\n') return -1;
            c->chunk_size = 0; c->bstate = B_CHUNK_SIZE;
            break;
        case B_TRAILER_START:
            if (p[i] == '\r') { i++; c->bstate = B_TRAILER_END; }
            else { i++; c->bstate = B_TRAILER_LINE; }
            break;
        case B_TRAILER_LINE: if (p[i++] == '\n') c->bstate = B_TRAILER_START; break;
        case B_TRAILER_END:
            if (p[i++] != '\n') return -1;
            *used = i; return 1;
        default: return -1;
        }
    }
    *used = i;
    return 0;
}

static void on_readable(conn_t *c, double t) {
    static char buf[RBUF];
    for (;;) {
        ssize_t r = read(c->fd, buf, sizeof buf);
        if (r == 0) {
            if (c->has_req && c->bstate == B_UNTIL_CLOSE) {
                record(c, t); close_conn(c); after_close(t);
                return;
            }
            fail_conn(c); return;
        }
        if (r < 0) {
            if (errno == EAGAIN) return;
            fail_conn(c); return;
        }
        if (!c->has_req) { fail_conn(c); return; } /* unsolicited bytes */
        if (c->t_first == 0) c->t_first = t;
        size_t off = 0;
        while (off < (size_t)r) {
            if (c->bstate == B_HEADERS) {
                /* copy byte by byte until the blank line (headers are small) */
                while (off < (size_t)r && c->bstate == B_HEADERS) {
                    if (c->hlen >= HDR_MAX - 1) { fail_conn(c); return; }
                    c->hdr[c->hlen++] = buf[off++];
                    if (c->hlen >= 4 && memcmp(c->hdr + c->hlen - 4, "\r\n\r\n", 4) == 0) {
                        if (parse_headers(c) < 0) { fail_conn(c); return; }
                        if (c->bstate == B_LENGTH && c->remaining == 0) goto done;
                    }
                }
                continue;
            }
            size_t used = 0;
            int rc = feed_body(c, buf + off, (size_t)r - off, &used);
            off += used;
            if (rc < 0) { fail_conn(c); return; }
            if (rc == 1) goto done;
            continue;
        done:
            record(c, t);
            if (c->conn_close) { close_conn(c); after_close(t); return; }
            if (off < (size_t)r) { fail_conn(c); return; } /* pipelined junk */
            conn_free(c, t);
            break;
        }
    }
}

static void on_writable(conn_t *c) {
    if (c->state == C_CONNECTING) {
        int err = 0; socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) { fail_conn(c); return; }
        c->state = C_IDLE;
        ep_set(c, 0);
        if (c->has_req) { double ti = c->t_intended; c->has_req = 0; start_request(c, ti); }
        else conn_free(c, now_s());
        return;
    }
    try_write(c);
}

static void arm_timer(double t_abs) {
    struct itimerspec its = {0};
    if (t_abs > 0) {
        its.it_value.tv_sec = (time_t)t_abs;
        its.it_value.tv_nsec = (long)((t_abs - (double)(time_t)t_abs) * 1e9);
        if (its.it_value.tv_sec == 0 && its.it_value.tv_nsec == 0) its.it_value.tv_nsec = 1;
    }
    if (timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL) < 0) die("timerfd_settime");
}

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(double *v, long n, double p) {
    if (n == 0) return NAN;
    double rank = p / 100.0 * (double)(n - 1);
    long lo = (long)floor(rank), hi = (long)ceil(rank);
    return v[lo] + (v[hi] - v[lo]) * (rank - (double)lo);
}

static void print_dist(const char *name, double *v, long n, int last) {
    if (n == 0) { printf("  \"%s_ms\": null%s\n", name, last ? "" : ","); return; }
    qsort(v, (size_t)n, sizeof(double), cmp_d);
    double sum = 0; for (long i = 0; i < n; i++) sum += v[i];
    printf("  \"%s_ms\": {\"mean\": %.4f, \"p50\": %.4f, \"p90\": %.4f, \"p99\": %.4f, "
           "\"p999\": %.4f, \"max\": %.4f}%s\n", name,
           n ? sum / (double)n * 1e3 : NAN, pct(v, n, 50) * 1e3, pct(v, n, 90) * 1e3,
           pct(v, n, 99) * 1e3, pct(v, n, 99.9) * 1e3, n ? v[n - 1] * 1e3 : NAN, last ? "" : ",");
}

static void usage(void) {
    fprintf(stderr, "usage: loadgen --port P --body-file F [--host H] [--path /x] [--header 'K: V']... "
                    "[--rate R] [--duration S] [--warmup S] [--conns N] [--grace S]\n");
    exit(2);
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1", *path = "/v1/chat/completions", *body_file = NULL;
    int port = 0;
    double rate = 100, duration = 10, warmup = 1, grace = 5;
    char headers[8192] = "";
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc) usage();
        const char *v = argv[++i];
        if (!strcmp(a, "--host")) host = v;
        else if (!strcmp(a, "--port")) port = atoi(v);
        else if (!strcmp(a, "--path")) path = v;
        else if (!strcmp(a, "--body-file")) body_file = v;
        else if (!strcmp(a, "--rate")) rate = atof(v);
        else if (!strcmp(a, "--duration")) duration = atof(v);
        else if (!strcmp(a, "--warmup")) warmup = atof(v);
        else if (!strcmp(a, "--conns")) max_conns = atoi(v);
        else if (!strcmp(a, "--grace")) grace = atof(v);
        else if (!strcmp(a, "--header")) {
            if (strlen(headers) + strlen(v) + 3 >= sizeof headers) usage();
            strcat(headers, v); strcat(headers, "\r\n");
        } else usage();
    }
    if (!port || !body_file || max_conns < 1 || max_conns > MAX_CONNS || duration <= 0 || duration > 600
        || rate < 0 || rate > 100000 || warmup < 0 || warmup > 60) usage();
    closed_loop = rate == 0;

    FILE *f = fopen(body_file, "rb");
    if (!f) die("body-file");
    static char body[65536];
    size_t blen = fread(body, 1, sizeof body, f);
    fclose(f);
    req_buf = malloc(blen + 16384);
    req_len = (size_t)snprintf(req_buf, 16384,
                               "POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                               "%sContent-Length: %zu\r\n\r\n", path, host, port, headers, blen);
    memcpy(req_buf + req_len, body, blen);
    req_len += blen;

    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) usage();

    signal(SIGPIPE, SIG_IGN);
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);

    double total_time = warmup + duration;
    long n_sched = closed_loop ? 0 : (long)ceil(total_time * rate);
    cap_res = closed_loop ? 1000000L : (long)ceil(duration * rate) + 16;
    lat = malloc(sizeof(double) * (size_t)cap_res); svc = malloc(sizeof(double) * (size_t)cap_res);
    ttfb = malloc(sizeof(double) * (size_t)cap_res); lag = malloc(sizeof(double) * (size_t)cap_res);
    evs = malloc(sizeof(long) * (size_t)cap_res);
    bl_cap = n_sched + 16;
    backlog = malloc(sizeof(double) * (size_t)bl_cap);
    if (!lat || !svc || !ttfb || !lag || !evs || !backlog) die("malloc");

    epfd = epoll_create1(EPOLL_CLOEXEC);
    tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    struct epoll_event tev = {.events = EPOLLIN, .data.u32 = 0xffffffffu};
    epoll_ctl(epfd, EPOLL_CTL_ADD, tfd, &tev);
    for (int i = 0; i < MAX_CONNS; i++) { conns[i].id = i; conns[i].fd = -1; conns[i].state = C_CLOSED; }

    /* pre-open a few connections so that connection setup is not in the measurement */
    int pre = closed_loop ? max_conns : (max_conns < 8 ? max_conns : 8);
    for (int i = 0; i < pre; i++) if (open_conn(&conns[i]) < 0) die("connect");
    {
        double deadline = now_s() + 5;
        struct epoll_event evv[64];
        int ready = 0;
        while (ready < pre && now_s() < deadline) {
            int n = epoll_wait(epfd, evv, 64, 100);
            for (int k = 0; k < n; k++) {
                uint32_t id = evv[k].data.u32;
                if (id == 0xffffffffu) continue;
                conn_t *c = &conns[id];
                if (c->state != C_CONNECTING) continue;
                int err = 0; socklen_t len = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err) { fprintf(stderr, "connect: %s\n", strerror(err)); exit(3); }
                c->state = C_IDLE; ep_set(c, 0); ready++;
            }
        }
        if (ready < pre) { fprintf(stderr, "could not connect\n"); exit(3); }
    }

    double t0 = now_s() + 0.01;
    double interval = closed_loop ? 0 : 1.0 / rate;
    t_measure_start = t0 + warmup;
    t_measure_end = t0 + total_time;
    stop_sending_at = t_measure_end;
    double hard_stop = t_measure_end + grace;
    long next_i = 0;

    if (closed_loop) {
        /* wait until t0, then every connection sends */
        while (now_s() < t0) ;
        for (int i = 0; i < max_conns; i++) start_request(&conns[i], now_s());
    } else {
        arm_timer(t0);
    }

    struct epoll_event evv[256];
    for (;;) {
        double t = now_s();
        if (!closed_loop) {
            while (next_i < n_sched && t0 + (double)next_i * interval <= t) {
                dispatch(t0 + (double)next_i * interval);
                next_i++;
            }
        }
        int inflight = 0;
        for (int i = 0; i < max_conns; i++) if (conns[i].has_req) { inflight = 1; break; }
        int sending_done = closed_loop ? t >= stop_sending_at : next_i >= n_sched;
        if (sending_done && !inflight && bl_head >= bl_tail) break;
        if (t >= hard_stop) break;
        if (!closed_loop && next_i < n_sched) arm_timer(t0 + (double)next_i * interval);
        int timeout_ms = closed_loop ? 50 : (next_i < n_sched ? 1000 : 50);
        int n = epoll_wait(epfd, evv, 256, timeout_ms);
        if (n < 0) { if (errno == EINTR) continue; die("epoll_wait"); }
        t = now_s();
        for (int k = 0; k < n; k++) {
            uint32_t id = evv[k].data.u32;
            if (id == 0xffffffffu) { uint64_t x; while (read(tfd, &x, sizeof x) > 0) ; continue; }
            conn_t *c = &conns[id];
            if (c->state == C_CLOSED) continue;
            if (evv[k].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) on_readable(c, t);
            if (c->state != C_CLOSED && (evv[k].events & EPOLLOUT)) on_writable(c);
        }
    }

    long unfinished = 0;
    for (int i = 0; i < max_conns; i++) if (conns[i].has_req) unfinished++;
    unfinished += bl_tail - bl_head;
    long unsent = closed_loop ? 0 : n_sched - next_i;

    double meas_time = duration;
    long measured = nres;
    long ev_min = -1, ev_max = 0; double ev_sum = 0;
    for (long i = 0; i < nres; i++) {
        if (ev_min < 0 || evs[i] < ev_min) ev_min = evs[i];
        if (evs[i] > ev_max) ev_max = evs[i];
        ev_sum += (double)evs[i];
    }
    printf("{\n");
    printf("  \"mode\": \"%s\",\n  \"target_rate\": %.1f,\n  \"duration_s\": %.1f,\n  \"warmup_s\": %.1f,\n",
           closed_loop ? "closed" : "open", rate, duration, warmup);
    printf("  \"scheduled\": %ld,\n  \"sent\": %ld,\n  \"done\": %ld,\n  \"ok\": %ld,\n  \"non2xx\": %ld,\n"
           "  \"errors\": %ld,\n  \"unfinished\": %ld,\n  \"unsent\": %ld,\n  \"connects\": %ld,\n"
           "  \"max_backlog\": %ld,\n",
           n_sched, n_sent, n_done, n_ok, n_non2xx, n_errors, unfinished, unsent, n_connects, max_backlog);
    printf("  \"measured\": %ld,\n  \"achieved_rps\": %.1f,\n", measured, (double)measured / meas_time);
    printf("  \"events_per_response\": {\"min\": %ld, \"max\": %ld, \"mean\": %.2f},\n",
           ev_min < 0 ? 0 : ev_min, ev_max, nres ? ev_sum / (double)nres : 0.0);
    printf("  \"body_bytes_total\": %ld,\n", total_body);
    print_dist("latency", lat, nres, 0);
    print_dist("service", svc, nres, 0);
    print_dist("ttfb", ttfb, nres, 0);
    print_dist("send_lag", lag, nres, 1);
    printf("}\n");
    return 0;
}
