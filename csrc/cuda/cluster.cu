// cluster.cu -- strategy "cluster" (sm_90+: Hopper and later): the persistent time loop of
// persistent.cuh with one team per thread-block cluster of RK_CLUSTER_SIZE blocks. A team owns
// a slice of the batch and meets at the hardware cluster barrier once per step, so no block
// waits on global-memory atomics and no launch depends on every block being resident at once.
// The cluster size is fixed at compile time (__cluster_dims__), so a plain launch works and the
// host launches a multiple of RK_CLUSTER_SIZE blocks.
#include "persistent.cuh"

#define RK_CLUSTER_KERNEL extern "C" __global__ void __cluster_dims__(RK_CLUSTER_SIZE, 1, 1)

// clang-format off
RK_CLUSTER_KERNEL rk_rnn_cluster_fwd(RK_PERSIST_FWD_ARGS) { rk_persist_fwd<RK_RNN, RK_TEAM_CLUSTER> RK_PERSIST_FWD_CALL; }
RK_CLUSTER_KERNEL rk_lstm_cluster_fwd(RK_PERSIST_FWD_ARGS) { rk_persist_fwd<RK_LSTM, RK_TEAM_CLUSTER> RK_PERSIST_FWD_CALL; }
RK_CLUSTER_KERNEL rk_gru_cluster_fwd(RK_PERSIST_FWD_ARGS) { rk_persist_fwd<RK_GRU, RK_TEAM_CLUSTER> RK_PERSIST_FWD_CALL; }
RK_CLUSTER_KERNEL rk_rnn_cluster_bwd(RK_PERSIST_BWD_ARGS) { rk_persist_bwd<RK_RNN, RK_TEAM_CLUSTER> RK_PERSIST_BWD_CALL; }
RK_CLUSTER_KERNEL rk_lstm_cluster_bwd(RK_PERSIST_BWD_ARGS) { rk_persist_bwd<RK_LSTM, RK_TEAM_CLUSTER> RK_PERSIST_BWD_CALL; }
RK_CLUSTER_KERNEL rk_gru_cluster_bwd(RK_PERSIST_BWD_ARGS) { rk_persist_bwd<RK_GRU, RK_TEAM_CLUSTER> RK_PERSIST_BWD_CALL; }
// clang-format on
