import Foundation
import QCowImage
import Testing
import TestSupport

/// Seeded random sequences of writes, zero writes, discards and compressed
/// writes against an in-memory model of the disk. After each sequence the
/// image reads back equal to the model, `qemu-img check` is clean and
/// `qemu-img compare` against a raw export of the model says identical.
@Suite struct WritePropertyTests {
    enum Backing: String, Sendable { case none, raw, qcow2 }

    struct Config: CustomTestStringConvertible, Sendable {
        var clusterSize: Int
        var refcountBits: Int = 16
        var extendedL2 = false
        var version = 3
        var backing: Backing = .none
        var compression: CompressionType = .zlib
        var seed: UInt64
        var operations = 24
        var testDescription: String {
            "v\(version) \(clusterSize)B rc\(refcountBits)\(extendedL2 ? " extl2" : "") backing=\(backing.rawValue) \(compression.name) seed \(seed)"
        }
        /// A disk of a few L2 tables' worth (bounded for big clusters), ending mid-cluster.
        var diskSize: UInt64 {
            let clusters = clusterSize >= 2 << 20 ? 6 : clusterSize >= 65536 ? 40 : 300
            return UInt64(clusters * clusterSize) - (clusterSize > 512 ? 512 : 0)
        }
    }

    /// `QBACKUP_SOAK=N` runs N rounds of every configuration with other seeds and longer sequences.
    static let soakRounds = max(1, Int(ProcessInfo.processInfo.environment["QBACKUP_SOAK"] ?? "") ?? 1)

    /// `QBACKUP_SEED=N` runs only the configuration with that seed (to reproduce a soak failure).
    static let configs: [Config] = (0..<soakRounds).flatMap { round in
        baseConfigs.map { c in
            var c = c
            c.seed += UInt64(round) * 1000
            c.operations *= round == 0 ? 1 : 4
            return c
        }
    }.filter { c in
        ProcessInfo.processInfo.environment["QBACKUP_SEED"].flatMap { UInt64($0) }.map { $0 == c.seed } ?? true
    }

    static let trace = ProcessInfo.processInfo.environment["QBACKUP_TRACE"] != nil

    static let baseConfigs: [Config] = {
        var out: [Config] = []
        var seed: UInt64 = 1
        func add(_ c: Config) { out.append(c); seed += 1 }
        for bits in [1, 2, 4, 8, 16, 32, 64] {
            add(Config(clusterSize: 512, refcountBits: bits, seed: seed))
            add(Config(clusterSize: 4096, refcountBits: bits, backing: bits % 2 == 0 ? .raw : .none, seed: seed))
        }
        for backing in [Backing.none, .raw, .qcow2] {
            add(Config(clusterSize: 65536, backing: backing, seed: seed))
            add(Config(clusterSize: 65536, extendedL2: true, backing: backing, compression: .zstd, seed: seed))
            add(Config(clusterSize: 16384, refcountBits: 64, extendedL2: true, backing: backing, seed: seed))
            add(Config(clusterSize: 4096, version: 2, backing: backing, seed: seed))
        }
        add(Config(clusterSize: 2 << 20, backing: .raw, seed: seed, operations: 10))
        add(Config(clusterSize: 2 << 20, extendedL2: true, backing: .qcow2, seed: seed, operations: 10))
        add(Config(clusterSize: 512, refcountBits: 64, backing: .qcow2, seed: seed, operations: 40))
        return out
    }()

    @Test(arguments: configs)
    func randomSequenceMatchesModel(_ config: Config) throws {
        let dir = TempDir()
        let size = config.diskSize
        let cs = config.clusterSize
        var rng = SeededRandom(seed: config.seed)
        var base = [UInt8](repeating: 0, count: Int(size))
        var options = QCowCreateOptions(size: size)
        options.clusterSize = cs
        options.refcountBits = config.refcountBits
        options.extendedL2 = config.extendedL2
        options.version = config.version
        options.compression = config.compression
        if config.backing != .none {
            // A backing file a little shorter than the disk: past its end reads zeros.
            let backingSize = Int(size) - cs / 2 - 512 > 0 ? Int(size) - (Int(size) / 5 & ~511) : Int(size)
            var content = [UInt8](repeating: 0, count: backingSize)
            fillRandom(&content[...], &rng, compressible: true)
            base.replaceSubrange(0..<backingSize, with: content)
            try Data(content).write(to: URL(fileURLWithPath: dir.file("base.raw")))
            if config.backing == .qcow2 {
                try Tools.qemuImg("convert", "-q", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=65536",
                                  dir.file("base.raw"), dir.file("base.qcow2"))
                options.backingFile = "base.qcow2"
                options.backingFormat = .qcow2
            } else {
                options.backingFile = "base.raw"
                options.backingFormat = .raw
            }
        }
        let path = dir.file("top.qcow2")
        try QCowCreator.create(at: path, options: options).close()
        var model = base
        let opened = try openWritableRetryingLock(path)
        let image = try #require(opened as? QCowFile)
        var observed: [(Range<UInt64>, GuestWriteKind)] = []
        image.writeObserver = { observed.append(($0, $1)) }
        let hideOnDiscard = config.version >= 3 || config.backing == .none

        for _ in 0..<config.operations {
            let kind = Int.random(in: 0..<10, using: &rng)
            let (offset, length) = randomRange(size: size, clusterSize: cs, rng: &rng)
            if Self.trace { print("op \(kind) offset \(offset) length \(length)") }
            switch kind {
            case 0..<5:
                var data = [UInt8](repeating: 0, count: Int(length))
                fillRandom(&data[...], &rng, compressible: Bool.random(using: &rng))
                try data.withUnsafeBytes { try image.write($0, at: offset) }
                model.replaceSubrange(Int(offset)..<Int(offset + length), with: data)
                #expect(observed.last.map { $0.0 == offset..<(offset + length) && $0.1 == .data } == true)
            case 5..<7:
                try image.writeZeroes(at: offset, length: length)
                model.replaceSubrange(Int(offset)..<Int(offset + length), with: repeatElement(0, count: Int(length)))
            case 7:
                try image.discard(at: offset, length: length)
                let end = offset + length
                let start = (offset + UInt64(cs) - 1) / UInt64(cs) * UInt64(cs)
                let stop = end == size ? size : end / UInt64(cs) * UInt64(cs)
                if start < stop {
                    for i in Int(start)..<Int(stop) { model[i] = hideOnDiscard ? 0 : base[i] }
                }
            default:
                let cluster = UInt64.random(in: 0..<((size + UInt64(cs) - 1) / UInt64(cs)), using: &rng) * UInt64(cs)
                let n = Int(min(UInt64(cs), size - cluster))
                var data = [UInt8](repeating: 0, count: n)
                fillRandom(&data[...], &rng, compressible: Int.random(in: 0..<4, using: &rng) != 0)
                try data.withUnsafeBytes { try image.writeCompressed(cluster: $0, at: cluster) }
                model.replaceSubrange(Int(cluster)..<(Int(cluster) + n), with: data)
            }
        }
        try image.flush()
        var readBack = [UInt8](repeating: 0xee, count: Int(size))
        try readBack.withUnsafeMutableBytes { try image.read(into: $0, at: 0) }
        image.close()
        let firstDifference = zip(readBack, model).enumerated().first { $0.element.0 != $0.element.1 }?.offset
        #expect(firstDifference == nil, "our reader disagrees with the model at byte \(firstDifference ?? -1)")
        try Tools.qemuImg("check", "-f", "qcow2", path)
        try Data(model).write(to: URL(fileURLWithPath: dir.file("model.raw")))
        try Tools.qemuImg("compare", "-q", "-f", "qcow2", "-F", "raw", path, dir.file("model.raw"))
    }

    /// Ranges that are sometimes cluster-aligned, sometimes subcluster-aligned, sometimes ragged.
    func randomRange(size: UInt64, clusterSize cs: Int, rng: inout SeededRandom) -> (UInt64, UInt64) {
        let style = Int.random(in: 0..<4, using: &rng)
        let maxLength = UInt64(min(3 * cs, 1 << 20, Int(size)))
        var offset = UInt64.random(in: 0..<size, using: &rng)
        var length = UInt64.random(in: 1...maxLength, using: &rng)
        switch style {
        case 0:
            offset &= ~UInt64(cs - 1)
            length = max(UInt64(cs), length & ~UInt64(cs - 1))
        case 1:
            let unit = UInt64(max(512, cs / 32))
            offset &= ~(unit - 1)
            length = max(unit, length & ~(unit - 1))
        default:
            break
        }
        if offset + length > size { length = size - offset }
        if length == 0 { length = 1; offset = size - 1 }
        return (offset, length)
    }

    func fillRandom(_ bytes: inout ArraySlice<UInt8>, _ rng: inout SeededRandom, compressible: Bool) {
        let pattern = UInt8.random(in: 1...255, using: &rng)
        bytes.withUnsafeMutableBytes { raw in
            var i = 0
            while i + 8 <= raw.count {
                let v = compressible ? UInt64(pattern) &* 0x0101_0101_0101_0101 ^ UInt64(i / 4096) : rng.next()
                raw.storeBytes(of: v, toByteOffset: i, as: UInt64.self)
                i += 8
            }
            while i < raw.count { raw[i] = pattern; i += 1 }
        }
    }
}
