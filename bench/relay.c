/* (A copy of ../shared/bench/floor/relay.c, for bench/ceiling.py.)
 * The floor for a UDP SIP balancer on this machine: a relay that parses nothing.
 * Datagrams from the client's port go to the server; everything else (the server answers
 * from a socket of its own) goes to the client. mode 0: recvfrom/sendto per datagram (blocking). mode 1: recvmmsg
 * (up to 64, MSG_WAITFORONE) + one sendmmsg for the batch.
 * usage: relay LISTEN_PORT SERVER_PORT CLIENT_PORT MODE   (all on 127.0.0.1) */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#define B 64
int main(int argc, char **argv) {
  if (argc < 5) { fprintf(stderr, "usage: relay LISTEN_PORT SERVER_PORT CLIENT_PORT MODE\n"); return 2; }
  int s = socket(AF_INET, SOCK_DGRAM, 0);
  struct sockaddr_in me = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
  inet_pton(AF_INET, "127.0.0.1", &me.sin_addr);
  if (bind(s, (void *)&me, sizeof me)) { perror("bind"); return 1; }
  int rb = 8 << 20; setsockopt(s, SOL_SOCKET, SO_RCVBUF, &rb, sizeof rb);
  struct sockaddr_in srv = me; srv.sin_port = htons(atoi(argv[2]));
  struct sockaddr_in cli = me; cli.sin_port = htons(atoi(argv[3]));
  int mode = atoi(argv[4]);
  static char buf[B][65536];
  static struct sockaddr_in from[B], to[B];
  static struct iovec iov[B], oiov[B];
  static struct mmsghdr in[B], out[B];
  for (;;) {
    if (mode == 0) {
      socklen_t fl = sizeof from[0];
      ssize_t n = recvfrom(s, buf[0], sizeof buf[0], 0, (void *)&from[0], &fl);
      if (n <= 0) continue;
      if (from[0].sin_port == cli.sin_port) sendto(s, buf[0], n, 0, (void *)&srv, sizeof srv);
      else sendto(s, buf[0], n, 0, (void *)&cli, sizeof cli);
    } else {
      for (int i = 0; i < B; i++) {
        iov[i].iov_base = buf[i]; iov[i].iov_len = sizeof buf[i];
        memset(&in[i].msg_hdr, 0, sizeof in[i].msg_hdr);
        in[i].msg_hdr.msg_iov = &iov[i]; in[i].msg_hdr.msg_iovlen = 1;
        in[i].msg_hdr.msg_name = &from[i]; in[i].msg_hdr.msg_namelen = sizeof from[i];
      }
      int n = recvmmsg(s, in, B, MSG_WAITFORONE, NULL);
      if (n <= 0) continue;
      for (int i = 0; i < n; i++) {
        to[i] = from[i].sin_port == cli.sin_port ? srv : cli;
        oiov[i].iov_base = buf[i]; oiov[i].iov_len = in[i].msg_len;
        memset(&out[i].msg_hdr, 0, sizeof out[i].msg_hdr);
        out[i].msg_hdr.msg_iov = &oiov[i]; out[i].msg_hdr.msg_iovlen = 1;
        out[i].msg_hdr.msg_name = &to[i]; out[i].msg_hdr.msg_namelen = sizeof to[i];
      }
      sendmmsg(s, out, n, 0);
    }
  }
}
