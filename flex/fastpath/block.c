/*
 * Fast front door for the tessera/block FlexVolume driver (optional).
 *
 * Why: kubelet starts the driver once per call. Even with the node agent (flex/agent.py) answering, a Python
 * launcher costs ~8 ms of interpreter start per call; this program costs ~1 ms. It forwards the call to the agent
 * over its unix socket, with the same wire format as flex/agent_client.py:
 *   request  "config\0node\0arg1\0arg2..." then shutdown(SHUT_WR);   reply  "exit-code\0reply-JSON"
 * and in every other case (init, no settings file, no agent, an agent that closes without answering) it execs the
 * launcher `block.py` next to it, which runs the call itself: a Python script, or with `flex.install --bundle` a
 * /bin/sh script starting the bundled runtime (flex/bundle.py). It never answers on its own, so it cannot disagree
 * with the Python shim. Linked -static, it needs nothing from the host's libc either.
 *
 * Settings: `block.agent` next to the executable, three lines: agent socket path, config path, node name
 * (written by `python -m flex.install --fast-launcher`).
 */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static char dir[PATH_MAX];

static void fallback(char **argv) {
    char py[PATH_MAX + 32];
    snprintf(py, sizeof py, "%s/block.py", dir);
    argv[0] = py;
    execv(py, argv);
    printf("{\"status\": \"Failure\", \"message\": \"tessera/block: cannot run %s: %s; re-run python -m flex.install\"}\n",
           py, strerror(errno));
    exit(1);
}

static int read_line(FILE *f, char *buf, size_t n) {
    if (!fgets(buf, (int)n, f)) return -1;
    buf[strcspn(buf, "\n")] = 0;
    return 0;
}

static int write_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) { if (errno == EINTR) continue; return -1; }
        p += w; n -= (size_t)w;
    }
    return 0;
}

int main(int argc, char **argv) {
    ssize_t len = readlink("/proc/self/exe", dir, sizeof dir - 1);
    if (len <= 0) return 1;
    dir[len] = 0;
    char *slash = strrchr(dir, '/');
    if (slash) *slash = 0;
    if (argc < 2 || strcmp(argv[1], "init") == 0) fallback(argv);

    char conf[PATH_MAX + 32], sock_path[PATH_MAX], config[PATH_MAX], node[256];
    snprintf(conf, sizeof conf, "%s/block.agent", dir);
    FILE *f = fopen(conf, "r");
    if (!f) fallback(argv);
    int bad = read_line(f, sock_path, sizeof sock_path) || read_line(f, config, sizeof config) ||
              read_line(f, node, sizeof node);
    fclose(f);
    if (bad || !sock_path[0] || strlen(sock_path) >= sizeof(((struct sockaddr_un *)0)->sun_path)) fallback(argv);

    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) fallback(argv);
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    strcpy(addr.sun_path, sock_path);
    if (connect(s, (struct sockaddr *)&addr, sizeof addr) < 0) { close(s); fallback(argv); }

    if (write_all(s, config, strlen(config) + 1) || write_all(s, node, strlen(node))) { close(s); fallback(argv); }
    for (int i = 1; i < argc; i++)
        if (write_all(s, "\0", 1) || write_all(s, argv[i], strlen(argv[i]))) { close(s); fallback(argv); }
    shutdown(s, SHUT_WR);

    size_t cap = 65536, used = 0;
    char *buf = malloc(cap);
    if (!buf) fallback(argv);
    for (;;) {
        if (used == cap) {
            cap *= 2;
            char *nb = realloc(buf, cap);
            if (!nb) { close(s); fallback(argv); }
            buf = nb;
        }
        ssize_t r = read(s, buf + used, cap - used);
        if (r < 0) { if (errno == EINTR) continue; close(s); fallback(argv); }
        if (r == 0) break;
        used += (size_t)r;
    }
    close(s);
    char *sep = memchr(buf, 0, used);
    if (!sep || sep == buf || sep + 1 >= buf + used || sep[1] != '{') fallback(argv);
    *sep = 0;
    char *end;
    long rc = strtol(buf, &end, 10);
    if (*end != 0 || rc < 0 || rc > 255) fallback(argv);
    if (write_all(1, sep + 1, (size_t)(buf + used - (sep + 1)))) return 1;
    return (int)rc;
}
