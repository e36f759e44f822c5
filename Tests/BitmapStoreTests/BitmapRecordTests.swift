import BitmapStore
import QCowImage
import Testing
import TestSupport

/// Round trips of the on-disk records, and their validation rules.
@Suite struct BitmapRecordTests {
    @Test func extensionRoundTrips() throws {
        let raw = RawBitmapsExtension(nbBitmaps: 3, bitmapDirectorySize: 96, bitmapDirectoryOffset: 0x30000)
        let bytes = raw.encoded()
        #expect(bytes.count == 24)
        var reader = ByteReader(bytes, region: "bitmaps extension")
        #expect(try RawBitmapsExtension(decoding: &reader) == raw)
        let model = try BitmapsExtension(validating: bytes, extensionOffset: 0x100, clusterSize: 65536, fileSize: 1 << 20)
        #expect(model.raw == raw)
        let bad = RawBitmapsExtension(nbBitmaps: 1, reserved: 7, bitmapDirectorySize: 32, bitmapDirectoryOffset: 0x10000)
        let error = try #require(throws: BitmapError.self) {
            try BitmapsExtension(validating: bad.encoded(), extensionOffset: 0x100, clusterSize: 65536, fileSize: 1 << 20)
        }
        #expect(error.offset == 0x104)
        #expect(error.message.contains("reserved"))
    }

    @Test(arguments: [0, 1, 5, 8, 13])
    func directoryEntryWithExtraDataRoundTrips(extra: Int) throws {
        let raw = RawBitmapDirectoryEntry(bitmapTableOffset: 0x50000, bitmapTableSize: 1, flags: 0b110, type: 1,
                                          granularityBits: 16, extraData: (0..<extra).map { UInt8($0 + 1) },
                                          name: Array("nightly-backup".utf8))
        let bytes = BitmapDirectory.encode([raw, raw])
        #expect(bytes.count == 2 * raw.encodedSize && raw.encodedSize % 8 == 0)
        let decoded = try BitmapDirectory.decode(bytes, baseOffset: 0x40000, expectedCount: 2)
        var expected = raw
        expected.padding = Array(repeating: 0, count: raw.encodedSize - 24 - extra - 14)
        #expect(decoded.map(\.entry) == [expected, expected])
        #expect(decoded.map(\.offset) == [0x40000, 0x40000 + UInt64(raw.encodedSize)])
        let geometry = BitmapGeometry(clusterSize: 65536, fileSize: 1 << 20, virtualSize: 1 << 30)
        let model = try BitmapDirectoryEntry(validating: decoded[0].entry, entryOffset: 0x40000, geometry: geometry)
        #expect(model.extraData == raw.extraData)
        #expect(model.raw.extraData == raw.extraData && model.raw.flags == raw.flags)
        #expect(!model.hasIncompatibleExtraData)
        #expect(try #require(throws: BitmapError.self) {
            try BitmapDirectory.decode(bytes, baseOffset: 0, expectedCount: 1)
        }.code == .corrupt)
    }

    @Test func tableEntriesClassifyAndRoundTrip() throws {
        let entries: [BitmapTableEntry] = [.allZeros, .allOnes, .data(at: 0x70000)]
        #expect(entries.map(\.kind) == [.allZeros, .allOnes, .data(0x70000)])
        let table = BitmapTable(offset: 0x60000, entries: entries)
        #expect(BitmapTable(decoding: table.encoded(), offset: 0x60000) == table)
        let geometry = BitmapGeometry(clusterSize: 65536, fileSize: 0x80000, virtualSize: 1 << 30)
        #expect(table.violations(geometry: geometry, bitmap: "t").isEmpty)
        let bad = BitmapTable(offset: 0x60000, entries: [BitmapTableEntry(rawValue: 0x70001), BitmapTableEntry(rawValue: 0x70200),
                                                       BitmapTableEntry(rawValue: 1 << 60), .data(at: 0x90000)])
        let problems = bad.violations(geometry: geometry, bitmap: "t")
        #expect(problems.map(\.offset) == [0x60000, 0x60008, 0x60010, 0x60018])
        #expect(problems.last?.code == .truncated)
    }
}
