#if canImport(Glibc)
import Glibc
#endif
import Dispatch
import Synchronization

/// Compresses the clusters of a chunk on every core: one thread per worker, each
/// with its own compressor (its deflate stream or zstd context kept between
/// clusters). Worker w starts with cluster w, then each takes the next cluster nobody
/// has taken yet, so a worker the scheduler holds back (a busy machine) delays the
/// chunk by one cluster, not by its whole share. The threads are the pool's own
/// for the whole copy, so "every core compressed" is a fact it can report
/// (`threadsThatCompressed`), not a hope about a shared thread pool.
final class CompressionPool: @unchecked Sendable {
    let type: CompressionType
    let workers: Int

    /// One unit of work: compress the pieces `todo` lists (offset and length in `input`,
    /// the same offset in `output`, at most `length - 1` bytes there), sizes into `sizes`.
    struct Job {
        var input: UnsafeRawBufferPointer
        var output: UnsafeMutableRawBufferPointer
        var pieces: [(start: Int, length: Int)]
        var todo: [Int]
        var sizes: UnsafeMutableBufferPointer<Int>
    }

    private final class Worker: @unchecked Sendable {
        let compressor: ClusterCompressor
        let go = DispatchSemaphore(value: 0)
        var thread: pthread_t?
        var compressed = 0
        unowned let pool: CompressionPool
        let index: Int
        init(_ pool: CompressionPool, _ index: Int) {
            self.pool = pool
            self.index = index
            compressor = ClusterCompressor(pool.type)
        }
    }

    private var pool: [Worker] = []
    private let done = DispatchSemaphore(value: 0)
    private var job: Job?
    /// The next cluster of the job (past each worker's first) that nobody has taken.
    private let next = Atomic<Int>(0)
    private var stopping = false
    private var threads: [pthread_t] = []

    init(_ type: CompressionType, workers: Int = max(1, System.coreCount)) {
        self.type = type
        self.workers = max(1, workers)
        pool = (0..<self.workers).map { Worker(self, $0) }
        for worker in pool {
            var thread = pthread_t()
            let context = Unmanaged.passRetained(worker).toOpaque()
            let started = pthread_create(&thread, nil, { raw in
                guard let raw else { return nil }
                let worker = Unmanaged<Worker>.fromOpaque(raw).takeRetainedValue()
                worker.pool.serve(worker)
                return nil
            }, context)
            if started == 0 {
                threads.append(thread)
            } else {
                // No thread: this worker's share runs on the caller's thread.
                Unmanaged<Worker>.fromOpaque(context).release()
                worker.thread = nil
                worker.compressed = -1
            }
        }
    }

    /// Stops and joins the threads (before the pool goes).
    func close() {
        stopping = true
        for worker in pool where worker.compressed >= 0 { worker.go.signal() }
        for thread in threads { pthread_join(thread, nil) }
        threads = []
    }

    /// How many distinct threads compressed at least one cluster so far.
    var threadsThatCompressed: Int { pool.filter { $0.compressed > 0 }.count }

    /// Runs `job` on every worker; returns when all are done.
    func run(_ job: Job) {
        self.job = job
        next.store(workers, ordering: .sequentiallyConsistent)
        var waiting = 0
        for worker in pool {
            if worker.compressed < 0 { share(of: worker, job) } else {
                worker.go.signal()
                waiting += 1
            }
        }
        for _ in 0..<waiting { done.wait() }
        self.job = nil
    }

    private func serve(_ worker: Worker) {
        worker.thread = pthread_self()
        while true {
            worker.go.wait()
            if stopping { return }
            if let job { share(of: worker, job) }
            done.signal()
        }
    }

    private func share(of worker: Worker, _ job: Job) {
        var t = worker.index
        while t < job.todo.count {
            defer { t = next.wrappingAdd(1, ordering: .relaxed).oldValue }
            let i = job.todo[t]
            let piece = job.pieces[i]
            let src = UnsafeRawBufferPointer(rebasing: job.input[piece.start..<(piece.start + piece.length)])
            let dst = UnsafeMutableRawBufferPointer(rebasing: job.output[piece.start..<(piece.start + piece.length)])
            job.sizes[i] = worker.compressor.compress(src, into: dst) ?? 0
            if worker.compressed >= 0 { worker.compressed += 1 }
        }
    }
}
