#include "pool.h"

#include <cstdlib>
#include <deque>
#include <mutex>
#include <utility>

#include "buffer.h"

namespace rk {
namespace {

constexpr size_t kHeader = 64;  // the block's size sits in front of the aligned data

std::mutex g_mutex;
std::deque<std::pair<size_t, void*>> g_free;  // (size, data), oldest first
size_t g_held = 0;
size_t g_limit = size_t(256) << 20;

void release(void* data) { std::free(static_cast<char*>(data) - kHeader); }

// frees the oldest blocks until the pool holds at most `limit` bytes (g_mutex held)
void trim(size_t limit) {
    while (g_held > limit && !g_free.empty()) {
        g_held -= g_free.front().first;
        release(g_free.front().second);
        g_free.pop_front();
    }
}

}  // namespace

void* pool_take(size_t bytes) {
    {
        std::lock_guard<std::mutex> lock(g_mutex);
        for (auto it = g_free.rbegin(); it != g_free.rend(); ++it) {  // most recent first
            if (it->first != bytes) continue;
            void* data = it->second;
            g_held -= bytes;
            g_free.erase(std::next(it).base());
            return data;
        }
    }
    void* raw = alloc_block(kHeader + bytes);  // large ones on huge pages (buffer.h)
    *static_cast<size_t*>(raw) = bytes;
    return static_cast<char*>(raw) + kHeader;
}

void pool_give(void* data) {
    if (!data) return;
    const size_t bytes = *reinterpret_cast<size_t*>(static_cast<char*>(data) - kHeader);
    std::lock_guard<std::mutex> lock(g_mutex);
    if (bytes > g_limit) {
        release(data);
        return;
    }
    trim(g_limit - bytes);
    g_free.emplace_back(bytes, data);
    g_held += bytes;
}

void set_pool_limit(size_t bytes) {
    std::lock_guard<std::mutex> lock(g_mutex);
    g_limit = bytes;
    trim(bytes);
}

size_t pool_limit() {
    std::lock_guard<std::mutex> lock(g_mutex);
    return g_limit;
}

size_t pool_held() {
    std::lock_guard<std::mutex> lock(g_mutex);
    return g_held;
}

}  // namespace rk
