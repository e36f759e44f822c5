import Glibc

extension String {
    /// printf-style text through the C library's `vsnprintf` (the C locale: a `.` decimal point),
    /// the same text `String(format:)` gave. Foundation's `String(format:)` goes through NSString,
    /// and any of Foundation's NSObject classes in the binary link ICU and its 30 MB of data in.
    public init(printf format: String, _ arguments: CVarArg...) {
        var capacity = 64
        while true {
            var buffer = [CChar](repeating: 0, count: capacity)
            let length = Int(withVaList(arguments) { vsnprintf(&buffer, capacity, format, $0) })
            guard length >= 0 else { self = ""; return }
            if length < capacity {
                self = String(decoding: buffer[..<length].map { UInt8(bitPattern: $0) }, as: UTF8.self)
                return
            }
            capacity = length + 1
        }
    }
}
