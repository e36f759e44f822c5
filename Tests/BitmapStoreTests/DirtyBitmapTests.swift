import BitmapStore
import Testing
import TestSupport

/// A bit per granule in a plain array: the obviously-right model DirtyBitmap is checked against.
struct BitmapModel {
    let virtualSize: UInt64
    let granularityBits: Int
    var bits: [Bool]
    var granularity: UInt64 { 1 << UInt64(granularityBits) }

    init(virtualSize: UInt64, granularityBits: Int) {
        self.virtualSize = virtualSize
        self.granularityBits = granularityBits
        let g = UInt64(1) << UInt64(granularityBits)
        bits = Array(repeating: false, count: Int((virtualSize + g - 1) / g))
    }

    mutating func set(_ r: Range<UInt64>) {
        for i in bits.indices where UInt64(i) * granularity < r.upperBound && UInt64(i + 1) * granularity > r.lowerBound { bits[i] = true }
    }

    mutating func clear(_ r: Range<UInt64>) {
        for i in bits.indices {
            let start = UInt64(i) * granularity
            let end = min(start + granularity, virtualSize)
            if start >= r.lowerBound && end <= r.upperBound { bits[i] = false }
        }
    }

    func isDirty(_ r: Range<UInt64>) -> Bool {
        bits.indices.contains { bits[$0] && UInt64($0) * granularity < min(r.upperBound, virtualSize) && UInt64($0 + 1) * granularity > r.lowerBound }
    }

    var extents: [DirtyExtent] {
        var out: [DirtyExtent] = []
        for (i, b) in bits.enumerated() {
            let start = UInt64(i) * granularity
            let end = min(start + granularity, virtualSize)
            if let last = out.last, last.dirty == b { out[out.count - 1].length = end - last.start } else {
                out.append(DirtyExtent(start: start, length: end - start, dirty: b))
            }
        }
        return out
    }

    var dirtyBytes: UInt64 {
        bits.indices.reduce(0) { bits[$1] ? $0 + min(granularity, virtualSize - UInt64($1) * granularity) : $0 }
    }
}

@Suite struct DirtyBitmapTests {
    static let seeds: [UInt64] = [1, 2, 3, 42, 1000, 0xdead_beef]

    func randomRange(_ rng: inout SeededRandom, size: UInt64) -> Range<UInt64> {
        let a = UInt64.random(in: 0...size + 100, using: &rng)
        let len = UInt64.random(in: 0...(Bool.random(using: &rng) ? 5000 : size / 3 + 1), using: &rng)
        return a..<(a + len)
    }

    @Test(arguments: seeds)
    func matchesModel(seed: UInt64) throws {
        var rng = SeededRandom(seed: seed)
        // Sizes around chunk boundaries (262144 bits) and odd tails.
        let granularityBits = [0, 3, 9][Int.random(in: 0..<3, using: &rng)]
        let granules = UInt64([1, 63, 64, 65, 4095, 262_143, 262_145, 600_001][Int.random(in: 0..<8, using: &rng)])
        let size = granules * (UInt64(1) << UInt64(granularityBits)) - UInt64.random(in: 0..<(UInt64(1) << UInt64(granularityBits)), using: &rng)
        var bitmap = try DirtyBitmap(virtualSize: size, granularityBits: granularityBits)
        var model = BitmapModel(virtualSize: size, granularityBits: granularityBits)
        for step in 0..<60 {
            let r = randomRange(&rng, size: size)
            switch Int.random(in: 0..<10, using: &rng) {
            case 0...4:
                bitmap.set(r)
                model.set(r)
            case 5...7:
                bitmap.clear(r)
                model.clear(r)
            case 8:
                #expect(bitmap.isDirty(r) == model.isDirty(r), "step \(step) isDirty(\(r))")
            default:
                if Int.random(in: 0..<8, using: &rng) == 0 {
                    bitmap.setAll()
                    model.set(0..<size)
                }
            }
        }
        #expect(Array(bitmap.extents()) == model.extents)
        #expect(bitmap.dirtyByteCount == model.dirtyBytes)
        #expect(bitmap.dirtyBitCount == UInt64(model.bits.filter { $0 }.count))
        for _ in 0..<20 {
            let off = UInt64.random(in: 0..<size, using: &rng)
            #expect(bitmap.isDirty(at: off) == model.bits[Int(off >> UInt64(granularityBits))])
        }
        // Extents of a sub-range are the whole-disk extents cut to it.
        let sub = randomRange(&rng, size: size).clamped(to: 0..<size)
        let cut = model.extents.compactMap { e -> DirtyExtent? in
            let s = max(e.start, sub.lowerBound), t = min(e.end, sub.upperBound)
            return s < t ? DirtyExtent(start: s, length: t - s, dirty: e.dirty) : nil
        }
        #expect(Array(bitmap.extents(in: sub)) == cut)
    }

    @Test(arguments: seeds)
    func unionAndConversionMatchModel(seed: UInt64) throws {
        var rng = SeededRandom(seed: seed)
        let size = UInt64.random(in: 1...(3 << 20), using: &rng)
        let gA = Int.random(in: 9...14, using: &rng), gB = Int.random(in: 9...16, using: &rng)
        var a = try DirtyBitmap(virtualSize: size, granularityBits: gA)
        var b = try DirtyBitmap(virtualSize: size, granularityBits: gB)
        var ma = BitmapModel(virtualSize: size, granularityBits: gA)
        var mb = BitmapModel(virtualSize: size, granularityBits: gB)
        for _ in 0..<30 {
            let r = randomRange(&rng, size: size)
            if Bool.random(using: &rng) { a.set(r); ma.set(r) } else { b.set(r); mb.set(r) }
        }
        // b's dirty runs dirty every granule of a they touch.
        for e in mb.extents where e.dirty { ma.set(e.start..<e.end) }
        try a.formUnion(b)
        #expect(Array(a.extents()) == ma.extents)

        let converted = try b.converted(toGranularityBits: gA)
        var mc = BitmapModel(virtualSize: size, granularityBits: gA)
        for e in mb.extents where e.dirty { mc.set(e.start..<e.end) }
        #expect(Array(converted.extents()) == mc.extents)
        #expect(try b.converted(toGranularityBits: gB) == b)
    }

    @Test func sameGranularityUnionIsBitwiseOr() throws {
        var a = try DirtyBitmap(virtualSize: 1 << 30, granularityBits: 9)
        var b = try DirtyBitmap(virtualSize: 1 << 30, granularityBits: 9)
        a.set(0..<512)
        b.set(700_000..<800_000)
        b.set(1 << 29..<(1 << 29) + 1)
        var expected = a
        expected.set(700_000..<800_000)
        expected.set(1 << 29..<(1 << 29) + 1)
        try a.formUnion(b)
        #expect(a == expected)
        #expect(a.dirtyBitCount == 1 + (799_999 / 512 - 700_000 / 512 + 1) + 1)
    }

    @Test func unionRefusesDifferentSizes() throws {
        var a = try DirtyBitmap(virtualSize: 1 << 20, granularityBits: 16)
        let b = try DirtyBitmap(virtualSize: 2 << 20, granularityBits: 16)
        #expect(throws: BitmapError.self) { try a.formUnion(b) }
    }

    @Test func serializationIsLsbFirstBytes() throws {
        var bitmap = try DirtyBitmap(virtualSize: 100 * 512, granularityBits: 9)
        bitmap.set(0..<1)            // bit 0
        bitmap.set(9 * 512..<9 * 512 + 1)  // bit 9 -> byte 1, bit 1
        bitmap.set(99 * 512..<100 * 512)   // bit 99 -> byte 12, bit 3
        var buffer = [UInt8](repeating: 0xff, count: 512)
        buffer.withUnsafeMutableBytes { bitmap.serializeCluster(0, clusterSize: 512, into: $0) }
        #expect(buffer[0] == 0x01)
        #expect(buffer[1] == 0x02)
        #expect(buffer[12] == 0x08)
        #expect(buffer[13...].allSatisfy { $0 == 0 })
        var back = try DirtyBitmap(virtualSize: 100 * 512, granularityBits: 9)
        // Tail bits past bit 99 in the data are ignored when loading.
        buffer[12] |= 0xf0
        buffer[40] = 0xff
        buffer.withUnsafeBytes { back.deserializeCluster(0, clusterSize: 512, from: $0) }
        #expect(back == bitmap)
    }

    @Test func hugeSparseBitmapCostsLittle() throws {
        // 1 TiB at 512 B granularity: 2^31 bits, 256 MiB if it were flat.
        var bitmap = try DirtyBitmap(virtualSize: 1 << 40, granularityBits: 9)
        #expect(bitmap.memoryFootprint < 1 << 20)
        bitmap.set(5 << 30..<(5 << 30) + 4096)
        bitmap.set((1 << 40) - 1..<(1 << 40))
        #expect(bitmap.memoryFootprint < 1 << 20)
        #expect(Array(bitmap.dirtyExtents()).count == 2)
        #expect(bitmap.dirtyByteCount == 4096 + 512)
        bitmap.clear(0..<(1 << 40))
        #expect(bitmap.isEmpty)
    }

    @Test func refusesBitmapsLargerThanQemuAllows() {
        #expect(throws: BitmapError.self) { try DirtyBitmap(virtualSize: 1 << 45, granularityBits: 9) }
    }
}
