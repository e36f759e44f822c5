/* Timing helper of the qbackup benchmark (compiled by bench/run.py).
 *
 *   runner RESULT_FILE TIMEOUT_SECONDS COMMAND [ARG...]
 *
 * Runs COMMAND (stdin, stdout and stderr inherited) and writes
 * "EXIT_STATUS WALL_SECONDS PEAK_RSS_KIB" to RESULT_FILE. The runner is a child
 * subreaper, so descendants that daemonize (qemu-nbd --fork) are re-parented to
 * it: the wall time runs until the last process of the run has exited, and the
 * peak RSS is the largest ru_maxrss of all of them. It is a tiny C program on
 * purpose: Linux carries the parent's RSS high-water mark into a child across
 * fork+exec, so measuring from Python would report Python's size as the floor.
 * EXIT_STATUS is -1 on timeout (the whole process group is killed).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static volatile pid_t child = 0;
static volatile sig_atomic_t timed_out = 0;

static void on_alarm(int sig) {
    (void)sig;
    timed_out = 1;
    if (child > 0) kill(-child, SIGKILL);
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: runner RESULT_FILE TIMEOUT_SECONDS COMMAND [ARG...]\n");
        return 125;
    }
    prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    struct sigaction sa = {0};
    sa.sa_handler = on_alarm;
    sigaction(SIGALRM, &sa, NULL);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    pid_t pid = fork();
    if (pid == 0) {
        setpgid(0, 0);
        execvp(argv[3], argv + 3);
        fprintf(stderr, "runner: cannot run %s\n", argv[3]);
        _exit(127);
    }
    if (pid < 0) return 126;
    child = pid;
    setpgid(pid, pid);
    alarm((unsigned)atoi(argv[2]));
    int rc = -1;
    long maxrss = 0;
    for (;;) {
        int st;
        struct rusage ru;
        pid_t w = wait4(-1, &st, 0, &ru);
        if (w < 0) {
            if (errno == EINTR) continue;
            break; /* ECHILD: every process of the run has exited */
        }
        if (ru.ru_maxrss > maxrss) maxrss = ru.ru_maxrss;
        if (w == pid) rc = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    alarm(0);
    double secs = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
    FILE *f = fopen(argv[1], "w");
    if (!f) return 124;
    fprintf(f, "%d %.9f %ld\n", timed_out ? -1 : rc, secs, maxrss);
    fclose(f);
    return 0;
}
