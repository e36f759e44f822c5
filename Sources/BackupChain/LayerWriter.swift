import QCowImage

/// How a layer's clusters are stored: plain, or compressed with zlib or zstd.
public enum LayerCompression: String, Sendable, CaseIterable { case none, zlib, zstd }

/// Writes a backup layer: the planned ranges read from the source, in large
/// chunks; clusters that read as zeros become zero clusters (incremental, so
/// they hide older data) or stay unallocated (full).
enum LayerWriter {
    static let chunkBytes = 4 << 20

    /// Creates `path` and fills it; returns the bytes of data written. With `durable`
    /// (backup and merge layers) the file is fsynced before returning.
    static func write(plan: CopyPlan, from source: BackupSource, to path: String, clusterSize: Int, backing: String?,
                      compression: LayerCompression, durable: Bool = true,
                      progress: ((UInt64, UInt64) -> Void)?) throws -> UInt64 {
        var options = QCowCreateOptions(size: source.virtualSize)
        options.clusterSize = clusterSize
        if let backing {
            options.backingFile = backing
            options.backingFormat = .qcow2
        }
        if compression == .zstd { options.compression = .zstd }
        let layer = try QCowCreator.create(at: path, options: options)
        defer { layer.close() }
        let cs = UInt64(clusterSize)
        let chunk = max(chunkBytes / clusterSize, 1) * clusterSize
        var buffer = [UInt8](repeating: 0, count: chunk)
        var written: UInt64 = 0
        var done: UInt64 = 0
        let hideZeros = backing != nil
        try buffer.withUnsafeMutableBytes { raw in
            for range in plan.ranges {
                var offset = range.lowerBound
                while offset < range.upperBound {
                    let n = Int(min(UInt64(chunk), range.upperBound - offset))
                    let part = UnsafeMutableRawBufferPointer(rebasing: raw[0..<n])
                    try source.read(into: part, at: offset)
                    // Walk the chunk cluster by cluster, writing runs of data and of zeros.
                    var runStart = 0
                    var runIsZero = false
                    var pos = 0
                    func flushRun(to end: Int) throws {
                        guard end > runStart else { return }
                        let at = offset + UInt64(runStart)
                        if runIsZero {
                            if hideZeros { try layer.writeZeroes(at: at, length: UInt64(end - runStart)) }
                        } else if compression != .none {
                            var c = runStart
                            while c < end {
                                let e = min(end, c + clusterSize)
                                let piece = UnsafeRawBufferPointer(rebasing: raw[c..<e])
                                if e - c == clusterSize {
                                    try layer.writeCompressed(cluster: piece, at: offset + UInt64(c))
                                } else {
                                    try layer.write(piece, at: offset + UInt64(c))
                                }
                                c = e
                            }
                            written += UInt64(end - runStart)
                        } else {
                            try layer.write(UnsafeRawBufferPointer(rebasing: raw[runStart..<end]), at: at)
                            written += UInt64(end - runStart)
                        }
                    }
                    while pos < n {
                        let end = min(n, pos + Int(cs))
                        let zero = isZero(UnsafeRawBufferPointer(rebasing: raw[pos..<end]))
                        if pos == 0 {
                            runIsZero = zero
                        } else if zero != runIsZero {
                            try flushRun(to: pos)
                            runStart = pos
                            runIsZero = zero
                        }
                        pos = end
                    }
                    try flushRun(to: n)
                    offset += UInt64(n)
                    done += UInt64(n)
                    progress?(done, plan.bytes)
                }
            }
        }
        if durable { try layer.flush() }
        return written
    }

    /// Whether every byte is zero (word at a time).
    static func isZero(_ bytes: UnsafeRawBufferPointer) -> Bool {
        let words = bytes.count / 8
        for i in 0..<words where bytes.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self) != 0 { return false }
        for i in (words * 8)..<bytes.count where bytes[i] != 0 { return false }
        return true
    }
}
