#if canImport(Glibc)
import Glibc
#endif

/// A mutex with one condition variable, for threads that wait on shared state (a read-ahead's
/// segments, a stream's ring, disks meeting at a step): `lock`/`unlock` around the state, `wait`
/// (with the lock held) until another thread `broadcast`s a change.
public final class ConditionLock: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let changed: UnsafeMutablePointer<pthread_cond_t>

    public init() {
        mutex = .allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
        changed = .allocate(capacity: 1)
        pthread_cond_init(changed, nil)
    }

    deinit {
        pthread_cond_destroy(changed)
        changed.deallocate()
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    public func lock() { pthread_mutex_lock(mutex) }
    public func unlock() { pthread_mutex_unlock(mutex) }

    /// With the lock held: releases it until a `broadcast` (or a spurious wake-up), then holds it again.
    public func wait() { pthread_cond_wait(changed, mutex) }

    /// Wakes every thread in `wait`.
    public func broadcast() { pthread_cond_broadcast(changed) }

    /// Runs `body` with the lock held.
    public func locked<T>(_ body: () throws -> T) rethrows -> T {
        lock()
        defer { unlock() }
        return try body()
    }
}
