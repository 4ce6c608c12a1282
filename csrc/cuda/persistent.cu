// persistent.cu -- strategy "persistent": one launch per layer and direction runs the whole
// time loop (persistent.cuh), the grid is one team of at most one block per SM that meets at
// the global-memory grid barrier of common.cuh. Runs on any GPU the other modules run on.
#include "persistent.cuh"

// clang-format off
extern "C" __global__ void rk_rnn_persist_fwd(RK_PERSIST_FWD_ARGS) { rk_persist_fwd<RK_RNN, RK_TEAM_GRID> RK_PERSIST_FWD_CALL; }
extern "C" __global__ void rk_lstm_persist_fwd(RK_PERSIST_FWD_ARGS) { rk_persist_fwd<RK_LSTM, RK_TEAM_GRID> RK_PERSIST_FWD_CALL; }
extern "C" __global__ void rk_gru_persist_fwd(RK_PERSIST_FWD_ARGS) { rk_persist_fwd<RK_GRU, RK_TEAM_GRID> RK_PERSIST_FWD_CALL; }
extern "C" __global__ void rk_rnn_persist_bwd(RK_PERSIST_BWD_ARGS) { rk_persist_bwd<RK_RNN, RK_TEAM_GRID> RK_PERSIST_BWD_CALL; }
extern "C" __global__ void rk_lstm_persist_bwd(RK_PERSIST_BWD_ARGS) { rk_persist_bwd<RK_LSTM, RK_TEAM_GRID> RK_PERSIST_BWD_CALL; }
extern "C" __global__ void rk_gru_persist_bwd(RK_PERSIST_BWD_ARGS) { rk_persist_bwd<RK_GRU, RK_TEAM_GRID> RK_PERSIST_BWD_CALL; }
// clang-format on
