import QCowImage

extension FuzzTargets {
    /// Writes into an image from bytes, as `backup` (bitmap updates), `commit`
    /// and `check --repair` will on a damaged source: a guest write, a zero
    /// write and a discard at places derived from the input, each read back,
    /// then the checker and a repair. The write engine must refuse damaged
    /// metadata with an error, never trap, and what it acknowledged must read back.
    public static func write(_ data: UnsafeRawBufferPointer) {
        let device = MemoryDevice(name: "<fuzz>", bytes: Array(data))
        // Bound what a fuzzed image can make the allocator grow the device to.
        guard UInt64(data.count) <= 4 << 20,
              let file = try? ImageOpener.openQCow(on: device, writable: true, files: MemoryFiles()), file.virtualSize > 0
        else { return }
        var seed: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in data.prefix(256) { seed = (seed ^ UInt64(byte)) &* 0x100_0000_01b3 }
        let size = file.virtualSize
        func place(_ salt: UInt64) -> (UInt64, Int) {
            let offset = ((seed ^ salt) % size) & ~511
            return (offset, Int(min(size - offset, 3 * 4096 + UInt64(salt & 511))))
        }

        let (at, length) = place(1)
        let pattern = (0..<length).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }
        if (try? pattern.withUnsafeBytes({ try file.write($0, at: at) })) != nil {
            expectReads(file, at: at, pattern, "write")
        }
        let (zeroAt, zeroLength) = place(2)
        if (try? file.writeZeroes(at: zeroAt, length: UInt64(zeroLength))) != nil {
            expectReads(file, at: zeroAt, [UInt8](repeating: 0, count: zeroLength), "zero write")
        }
        let (discardAt, discardLength) = place(3)
        _ = try? file.discard(at: discardAt, length: UInt64(discardLength))
        _ = try? file.flush()
        _ = try? QCowChecker.check(file)
        _ = try? QCowChecker.check(file, repair: .all)
    }

    /// What a write acknowledged reads back (a failed read is allowed: the metadata is hostile).
    static func expectReads(_ file: QCowFile, at offset: UInt64, _ expected: [UInt8], _ what: String) {
        var back = [UInt8](repeating: 0xee, count: expected.count)
        guard (try? back.withUnsafeMutableBytes({ try file.read(into: $0, at: offset) })) != nil else { return }
        expect(back == expected, "\(what) of \(expected.count) bytes at \(offset) acknowledged but reads back differently")
    }
}
