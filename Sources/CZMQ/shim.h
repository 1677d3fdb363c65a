// libzmq (Debian libzmq3-dev). The cluster module (coordinator, workers) sits on it.
#include <zmq.h>
