module github.com/goplug/goplug-go

go 1.19
